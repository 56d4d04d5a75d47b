"""The one owner of what a run folder holds; nothing outside this package parses manifest lines or run.json.

- records.py: the manifest's record schema (`Record`), the writer (`Manifest`) and the readers of its parts
- current.py: the one rule for which record of each (image, output name) slot is current
- runinfo.py: the run record (run.json, a shard's run.shard-I-of-N.json), one error policy
- folder.py: a run folder read back (`read_run`): its rows, method labels, images and maps
- finished.py: the index of finished work that a rerun skips
- parts.py: the shard parts and `merge`
- evaluation.py, comparison.py: the result files of `evaluate` and `compare`
"""
