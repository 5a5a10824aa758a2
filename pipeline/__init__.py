"""Ray Data stages, object-storage I/O, dataset formats and metrics for GSVA at dataset scale."""
