"""Data errors that name the file and the fix (never a stack trace from deep inside TFDS)."""


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or malformed. The message names the file and the fix."""


def claim_classes(seen: dict[str, str], names, split: str, where: str) -> None:
    """Record ``names`` as ``split``'s classes in ``seen`` (class name -> split); a DataError naming
    ``where`` if one already belongs to another split (its images would be in both)."""
    for name in names:
        if seen.setdefault(name, split) != split:
            raise DataError(
                f"{where}: class {name} is also in the {seen[name]} split; the splits must not "
                "share classes (are all files from one distribution of the dataset?)"
            )
