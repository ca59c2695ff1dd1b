"""Problem sets: dataset presets and Parquet files, the arithmetic generator, answer checking."""
