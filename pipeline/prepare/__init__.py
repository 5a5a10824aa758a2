"""The prepare job: source formats (`formats/`) -> task shards, as a Ray Data graph (`graph`)."""
