"""Sets the repository address everywhere it is written, from one value.

    python notebooks/set_repo_url.py https://github.com/OWNER/NAME    # set it
    python notebooks/set_repo_url.py --check                          # show where it is used

The address lives in setup.cfg (`[metadata] url`). A notebook opened on Colab cannot read
setup.cfg before it has cloned the repository, so the address is also copied, verbatim, into
each notebook's setup cell (`REPO_URL = os.environ.get("DIDISTILL_REPO_URL", "...")`) and into
the "Open in Colab" badges of README.md, notebooks/README.md and the notebooks
(`https://colab.research.google.com/github/OWNER/NAME/blob/main/notebooks/<name>.ipynb`).
This script replaces the old address by the new one in all of those files;
tests/test_notebooks.py checks that they agree with setup.cfg.
"""

from __future__ import annotations

import argparse
import configparser
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GITHUB = re.compile(r"^https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)$")


def current_url(root: Path = ROOT) -> str:
    parser = configparser.ConfigParser()
    parser.read(root / "setup.cfg")
    return parser["metadata"]["url"].strip()


def files_using(root: Path = ROOT) -> list[Path]:
    return [
        root / "setup.cfg",
        root / "README.md",
        root / "notebooks" / "README.md",
        *sorted((root / "notebooks").glob("*.ipynb")),
    ]


def set_url(new: str, root: Path = ROOT) -> list[Path]:
    """Replaces setup.cfg's address (and its Colab form) by `new` in every file; returns the
    files changed."""
    match = GITHUB.match(new.rstrip("/"))
    if match is None:
        raise ValueError(f"{new!r} is not https://github.com/OWNER/NAME (Colab opens GitHub)")
    new = new.rstrip("/")
    old = current_url(root)
    old_owner_repo = old.removeprefix("https://github.com/")
    new_owner_repo = new.removeprefix("https://github.com/")
    replacements = [
        (old, new),
        (
            f"colab.research.google.com/github/{old_owner_repo}/",
            f"colab.research.google.com/github/{new_owner_repo}/",
        ),
    ]
    changed = []
    for path in files_using(root):
        text = path.read_text()
        updated = text
        for a, b in replacements:
            updated = updated.replace(a, b)
        if updated != text:
            path.write_text(updated)
            changed.append(path)
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", help="https://github.com/OWNER/NAME")
    parser.add_argument("--check", action="store_true", help="print the address and its files")
    args = parser.parse_args(argv)
    if args.check or not args.url:
        url = current_url()
        owner_repo = url.removeprefix("https://github.com/")
        print(f"setup.cfg url: {url}")
        for path in files_using():
            print(f"  {path.relative_to(ROOT)}: {path.read_text().count(owner_repo)} uses")
        return 0
    try:
        changed = set_url(args.url)
    except ValueError as err:
        print(f"set_repo_url: error: {err}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
