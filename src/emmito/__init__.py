"""emmito: mitochondria instance segmentation of EM volumes, blockwise, as a Snakemake workflow."""

__version__ = "0.1.0"
