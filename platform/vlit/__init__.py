"""vlit: a Ray-distributed data and training platform for vision-language instruction tuning."""
__version__ = "0.1.0"
