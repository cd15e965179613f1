#!/usr/bin/env python
"""The run report: one self-contained HTML page (montages, training curves, metrics tables,
config and provenance) plus its figures as PNG files for Snakemake's --report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medldm.errors import run_cli
from medldm.io import write_text
from medldm.report.page import build_report
from medldm.runtime import setup_logging
from medldm.settings import load_settings

log = logging.getLogger("report")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", required=True,
                        help="JSON: manifest, fid_weights, vae/ldm/sample_sets entries (see medldm.report.page.build_report)")
    parser.add_argument("--config", required=True, help="the whole workflow config (JSON or YAML file), shown in the page")
    parser.add_argument("--montage-volumes", type=int, default=4, help="volumes per class in each montage")
    parser.add_argument("--out", required=True, type=Path, help="index.html to write")
    parser.add_argument("--figures", required=True, type=Path, help="folder for the figures (PNG)")
    args = parser.parse_args(argv)
    setup_logging()
    page = build_report(load_settings(args.inputs), load_settings(args.config), args.figures, args.montage_volumes)
    write_text(args.out, page)
    log.info("report: %s (%.1f MB), figures in %s", args.out, len(page) / 1e6, args.figures)
    return 0


if __name__ == "__main__":
    run_cli(main)
