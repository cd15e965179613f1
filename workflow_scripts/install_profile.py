#!/usr/bin/env python
"""Install profiles/slurm as your Snakemake profile "slurm", so that `snakemake --profile slurm`
works from any directory. Links (default) or copies it to $XDG_CONFIG_HOME/snakemake/slurm
(default ~/.config/snakemake/slurm). Standard library only: runs before the package is installed.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_REFUSED = 2


def config_dir() -> Path:
    """Snakemake's user profile folder on Linux (where `--profile NAME` is looked up)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "snakemake"


def same_tree(a: Path, b: Path) -> bool:
    """True if folders a and b hold the same files with the same content."""
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def install(source: Path, dest: Path, copy: bool, force: bool) -> int:
    source = source.resolve()
    if not (source / "config.yaml").is_file():
        print(f"error: {source} is not a Snakemake profile (no config.yaml)", file=sys.stderr)
        return EXIT_REFUSED
    linked_to_ours = dest.is_symlink() and dest.resolve() == source
    copy_of_ours = dest.is_dir() and not dest.is_symlink() and same_tree(source, dest)
    if (linked_to_ours and not copy) or (copy_of_ours and copy):
        print(f"{dest} is already this profile ({source}); nothing to do")
        return 0
    if dest.is_symlink() or dest.exists():
        if not (force or linked_to_ours or copy_of_ours):
            what = f"a link to {os.readlink(dest)}" if dest.is_symlink() else "a different profile"
            print(
                f"error: {dest} exists and is {what}; "
                "rerun with --force to replace it (or pick another --name)",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        else:
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copytree(source, dest)
    else:
        dest.symlink_to(source, target_is_directory=True)
    print(
        f"{'copied' if copy else 'linked'} {source} -> {dest}; use: snakemake --profile {dest.name}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--source", type=Path, default=REPO / "profiles" / "slurm", help="profile folder to install"
    )
    parser.add_argument("--name", default="slurm", help="profile name (default: slurm)")
    parser.add_argument(
        "--copy", action="store_true", help="copy instead of symlink (edits then stay local)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing, different profile of that name"
    )
    args = parser.parse_args(argv)
    return install(args.source, config_dir() / args.name, args.copy, args.force)


if __name__ == "__main__":
    sys.exit(main())
