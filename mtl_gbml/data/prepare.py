"""Prepare a dataset once, offline, from its raw files:

    python -m mtl_gbml.data.prepare --dataset NAME --manual_dir DIR [--data_dir DIR]

NAME is one of omniglot, mini_imagenet, tiered_imagenet, cifar_fs, fc100. ``--manual_dir`` holds
the raw distribution files (default ``$MTL_GBML_DATA_DIR/NAME``):

- omniglot: ``images_background.zip``, ``images_evaluation.zip`` (Vinyals split files in
  ``DIR/splits/omniglot_vinyals`` or ``DIR/../splits/omniglot_vinyals``);
- mini_imagenet: ``mini-imagenet-cache-{train,val,test}.pkl``, or ``images/`` +
  ``{train,val,test}.csv``;
- tiered_imagenet: ``{train,val,test}_images_png.pkl`` + ``{train,val,test}_labels.pkl``;
- cifar_fs, fc100: ``cifar-100-python.tar.gz`` (the class lists ship with the package).

Prepared data goes to ``--data_dir`` (else TFDS's default, which honours ``$TFDS_DATA_DIR``); point
training at it with ``config.data.tfds_dir`` (or the same ``$TFDS_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import os
import sys

from mtl_gbml.data import datasets
from mtl_gbml.data.errors import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mtl_gbml.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=datasets.DATASETS)
    p.add_argument("--manual_dir", default="", help="raw files (default $MTL_GBML_DATA_DIR/NAME)")
    p.add_argument("--data_dir", default="", help="TFDS data dir (default TFDS's, $TFDS_DATA_DIR)")
    p.add_argument(
        "--protocol",
        default="",
        help="omniglot only: 'vinyals' (default) or 'lake'; the others have 'standard'",
    )
    args = p.parse_args(argv)
    manual = args.manual_dir
    if not manual:
        root = os.environ.get("MTL_GBML_DATA_DIR", "")
        if not root:
            p.error("give --manual_dir, or set $MTL_GBML_DATA_DIR to a directory holding NAME/")
        manual = os.path.join(root, args.dataset)
    protocol = args.protocol or datasets.PROTOCOLS[args.dataset][0]
    if protocol not in datasets.PROTOCOLS[args.dataset]:
        p.error(f"--protocol {protocol!r}: {args.dataset} has {datasets.PROTOCOLS[args.dataset]}")
    try:
        built = datasets.prepare_from(args.dataset, manual, args.data_dir, protocol)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    where = args.data_dir or os.environ.get("TFDS_DATA_DIR", "TFDS's default data dir")
    state = "prepared" if built else "already prepared"
    print(f"{args.dataset} ({protocol}) {state} in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
