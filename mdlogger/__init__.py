"""mdlogger: a supervised, multiprocess market-data logger writing columnar files."""

__version__ = "0.1.0"
