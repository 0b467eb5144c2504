"""The pipeline: build one artifact or many, above the exporter, the targets and validation."""
