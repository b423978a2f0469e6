"""The offline demo tasks on real weights and data that ship in packages (no Hub access needed)."""

from .classification import DemoOptions, DemoReport, format_report, linear_probe, run_demo

__all__ = ["DemoOptions", "DemoReport", "format_report", "linear_probe", "run_demo"]
