"""segany: promptable image segmentation with the Segment Anything family."""

__version__ = "0.1.0"
