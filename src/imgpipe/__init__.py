"""imgpipe: crawl, clean, split, train and compare image classifiers, reproducibly."""

__version__ = "0.1.0"
