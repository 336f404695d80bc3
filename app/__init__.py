"""thresher: select the grain from the chaff (coreset or random), then train on the grain."""
__version__ = "0.1.0"
