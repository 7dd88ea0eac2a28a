"""Classification labels: their canonical names, the label set's order, and integer ids mapped to the
names of data.labels. Free of torch and tokenizers, so config checks can use it."""

from __future__ import annotations

from pretune.data.sources import DataError


def label_name(value) -> str:
    """A label's class name. Text is stripped ("pos " and "pos" are one class); JSON true/false
    become "true"/"false" (as a CSV spells them); an integral number is written as an integer, so 1
    and 1.0 are one class; any other number keeps its decimal form (0.5 -> "0.5")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def duplicate_labels(labels: list) -> list[str]:
    """The names that data.labels lists more than once, compared as records' labels are (label_name):
    a head would get an output per copy, and the later copies would never be a record's label."""
    seen, twice = set(), []
    for name in map(label_name, labels):
        if name in seen and name not in twice:
            twice.append(name)
        seen.add(name)
    return twice


def label_names(found: set[str]) -> list[str]:
    """The label set in a stable order: integer ids by value (so head output i is label id i when
    the ids run 0..n-1), other names alphabetically."""
    if all(x.lstrip("-").isdigit() for x in found):
        return sorted(found, key=int)
    return sorted(found)


def out_of_range(label: str, labels: list[str]) -> str | None:
    """Why `label` is no class of `labels` when it is an integer id past their end (data.labels names
    the classes, records give ids); None when it is not an id or the names are ids themselves."""
    if not label.isdigit() or any(x.isdigit() for x in labels) or int(label) < len(labels):
        return None
    return f"label id {label} is out of range for data.labels ({len(labels)} names: {', '.join(labels)})"


def ids_to_names(records: list[dict], labels: list[str], on_error: str = "fail") -> None:
    """With data.labels given (the names in id order), each record that carries an integer id
    instead of a name gets the name, in place, whatever the other records carry (a training file of
    ids and a test file of names go together). A record whose id is past the names' end stops the
    run with its file and line (data.on_error=fail), or keeps its id, for encoding to skip and count
    (skip). Names that are ids themselves (data.labels=[0, 1]) map nothing."""
    if any(x.isdigit() for x in labels):
        return
    for r in records:
        if not r["label"].isdigit():
            continue
        problem = out_of_range(r["label"], labels)
        if problem is None:
            r["label"] = labels[int(r["label"])]
        elif on_error == "fail":
            where = getattr(r, "where", "")
            raise DataError(f"{where}: {problem}" if where else problem)
