"""The export job: annotate predictions -> files other tools and jobs read (COCO results, task shards)."""
