"""The base layer every other part of lvdkit builds on: files and URIs, image decoding, Parquet I/O, k-NN and
whitening, settings, the Ray session and the schema of every table.

It imports no other lvdkit package (a test reads every module's imports to hold that), so the stage packages,
the runner and pretraining can all share it without depending on each other.
"""
