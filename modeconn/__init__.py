"""modeconn: find and measure low-loss paths between independently trained neural networks."""
__version__ = "0.1.0"
