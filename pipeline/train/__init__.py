"""The train job's parts: config, Ray Data ingestion, the per-worker recipe, checkpoints, launch on Ray Train.

Read in this order: ``config`` (what a run is), ``data`` (task shards -> samples), ``recipe`` (one worker's
setup / train / checkpoint / cleanup), ``launch`` (TorchTrainer, storage, resume, export).
"""
