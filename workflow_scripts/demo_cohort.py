#!/usr/bin/env python
"""Build the demo cohort: deformed MNI152 subjects (HC / TLE-like) with tissue label maps."""

from __future__ import annotations

import argparse

from medldm.data.demo import write_cohort
from medldm.errors import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", required=True, help="folder for images/, labels/ and samples.tsv")
    parser.add_argument("--n-subjects", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lesion-class", default="TLE", help="class carrying the mesial-temporal atrophy")
    parser.add_argument("--resolution-mm", type=int, choices=(1, 2), default=2, help="template resolution")
    parser.add_argument("--masks-per-subject", type=int, default=0,
                        help="inpainting masks per subject (0: none), each a sheet row grouped by subject")
    parser.add_argument("--ellipsoids", type=int, default=3, help="random ellipsoids per mask")
    args = parser.parse_args(argv)
    sheet = write_cohort(args.out_dir, args.n_subjects, args.seed, args.lesion_class, args.resolution_mm,
                         masks_per_subject=args.masks_per_subject, ellipsoids=args.ellipsoids)
    print(f"wrote {args.n_subjects} subjects and {sheet}")
    return 0


if __name__ == "__main__":
    run_cli(main)
