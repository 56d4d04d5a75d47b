"""The engines behind `saliency_cli.api`: plan (options, jobs, validation, targets), decode (prefetch), resume
(the index of finished work), outputs (writer thread, manifest, counts), explain, runs (reading run folders
back), evaluate and its files."""
