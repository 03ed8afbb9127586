"""Every Parquet column name and schema lvdkit reads or writes.

One module so that stages, tests, benchmarks and the README agree. Users can open any of these tables with pandas,
polars or duckdb; the README documents each one.
"""

from __future__ import annotations

import pyarrow as pa

# --- column names shared across tables ---------------------------------------------------------------------------
IMAGE_ID = "image_id"  # stable id of an input file: 16 hex chars of blake2b(uri)
URI = "uri"  # where the file was read from (local path or filesystem URI)
GROUP_ID = "group_id"  # duplicate group (the image_id of the image kept for the group)
KEEP = "keep"  # True for the one image kept per group
DUP_OF = "dup_of"  # image_id of the kept image this one duplicates (null when kept)
STATUS_COL = "status"  # ok | quarantined (ingest); kept | duplicate | quarantined (status.parquet)
ERROR = "error"  # ingest: the quarantine reason
CONTENT_HASH = "content_hash"  # blake2b-128 hex of the file bytes
PHASH = "phash"  # imagededup PHash (64 bits)
DHASH = "dhash"  # imagededup DHash (64 bits): confirms PHash matches
IMAGE = "image"  # curated set: the file's bytes (or re-encoded at curated.max_side)
IMAGE_BYTES = "image_bytes"  # ingest: the file's bytes, only with ingest.keep_bytes=true
WIDTH, HEIGHT, FORMAT = "width", "height", "format"  # after EXIF orientation; Pillow's format name
ERROR_DETAIL = "error_detail"  # ingest: the exception text, for humans
DISTANCE = "distance"  # dedup: to the kept image; cluster: 1 - cosine to the level-1 centroid
SIZE_BYTES = "size_bytes"  # ingest: the file's size in bytes
MODE = "mode"  # ingest: Pillow mode of the stored image (RGB, L, CMYK, P, I;16, ...)
N_FRAMES = "n_frames"  # ingest: number of frames (>1 for animated images; the first frame is used)
METADATA = "metadata"  # ingest: JSON of a container record's other members / columns (captions, json, url, ...)

# Status values of the final per-image decision (``status.parquet``).
STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"
FINAL_KEPT = "kept"
FINAL_DUPLICATE = "duplicate"

# Quarantine reasons written by ingest (``error`` column). Each is specific enough to act on.
REASON_EMPTY = "empty_file"
REASON_UNREADABLE = "unreadable"  # permission denied, vanished between listing and reading, I/O error
REASON_NOT_FILE = "not_a_regular_file"
REASON_FILE_TOO_LARGE = "file_too_large"
REASON_NOT_IMAGE = "not_an_image"
REASON_TRUNCATED = "truncated"
REASON_DECODE = "decode_error"
REASON_TOO_MANY_PIXELS = "too_many_pixels"
REASON_TOO_SMALL = "too_small"
REASON_DECODE_TIMEOUT = "decode_timeout"  # decoding took longer than ingest.decode_timeout_s
REASON_SYMLINK_OUTSIDE = "symlink_outside_inputs"  # a link in an input folder pointing outside every input
REASON_FORMAT = "format_not_allowed"  # a format outside ingest.formats, known by its signature (never parsed)
REASON_PROCESSING = "processing_error"  # on_part_error=quarantine: processing the file raised on every attempt
REASON_CONTAINER = "container_error"  # a tar or table that cannot be read at all (or has no image column)
REASON_NO_IMAGE = "no_image_in_sample"  # a WebDataset sample without an image member (its metadata is kept)
REASONS = (
    REASON_EMPTY,
    REASON_UNREADABLE,
    REASON_NOT_FILE,
    REASON_FILE_TOO_LARGE,
    REASON_NOT_IMAGE,
    REASON_TRUNCATED,
    REASON_DECODE,
    REASON_TOO_MANY_PIXELS,
    REASON_TOO_SMALL,
    REASON_DECODE_TIMEOUT,
    REASON_SYMLINK_OUTSIDE,
    REASON_FORMAT,
    REASON_PROCESSING,
    REASON_CONTAINER,
    REASON_NO_IMAGE,
)

# --- ingest: OUT/ingest/part-*.parquet --------------------------------------------------------------------------
INGEST = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(URI, pa.string(), nullable=False),
        pa.field(SIZE_BYTES, pa.int64()),
        pa.field(CONTENT_HASH, pa.string()),  # blake2b-128 hex of the file bytes
        pa.field(FORMAT, pa.string()),  # Pillow format: JPEG, PNG, GIF, ...
        pa.field(WIDTH, pa.int32()),  # after EXIF orientation
        pa.field(HEIGHT, pa.int32()),
        pa.field(MODE, pa.string()),  # Pillow mode of the stored image: RGB, L, CMYK, P, I;16, ...
        pa.field(N_FRAMES, pa.int32()),  # >1 for animated images; the first frame is used
        pa.field(PHASH, pa.uint64()),  # imagededup PHash (64 bits), computed while the image is decoded
        pa.field(DHASH, pa.uint64()),  # imagededup DHash (64 bits), with the PHash: dedup_phash.confirm_dhash
        pa.field(STATUS_COL, pa.string(), nullable=False),  # ok | quarantined
        pa.field(ERROR, pa.string()),  # quarantine reason (one of REASONS) for quarantined rows
        pa.field(ERROR_DETAIL, pa.string()),  # the exception text, for humans
        pa.field(IMAGE_BYTES, pa.binary()),  # only with ingest.keep_bytes=true
        pa.field(METADATA, pa.string()),  # container records: JSON of the sample's other members / row's columns
    ]
)

# --- dedup_exact / dedup_phash: OUT/<stage>/part-*.parquet -------------------------------------------------------
DEDUP = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(GROUP_ID, pa.string(), nullable=False),
        pa.field(KEEP, pa.bool_(), nullable=False),
        pa.field(DUP_OF, pa.string()),
        pa.field(DISTANCE, pa.float32()),  # to the kept image: Hamming bits (phash), 0 (exact)
    ]
)

# --- embed: OUT/embed/part-*.parquet (one embedding column per configured model) and OUT/embed/calibration/ ------
EMBEDDING_PREFIX = "embedding_"  # + the model's key in embed.models, e.g. embedding_copy, embedding_semantic
EDIT = "edit"  # calibration rows: the synthetic edit (crop, jpeg, ...) applied to the source image


def embedding_column(key: str) -> str:
    """Column holding model ``key``'s L2-normalised embeddings."""
    return EMBEDDING_PREFIX + key


def embedding_type(dim: int) -> pa.DataType:
    """Arrow type of one embedding: ``fixed_size_list<float32>[dim]`` (zero-copy to a [N, dim] numpy array)."""
    return pa.list_(pa.float32(), dim)


def embed_schema(dims: dict[str, int], calibration: bool = False) -> pa.Schema:
    """Schema of embed parts (``calibration``: of the synthetic copies used to calibrate dedup_copy)."""
    fields = [pa.field(IMAGE_ID, pa.string(), nullable=False)]
    if calibration:
        fields.append(pa.field(EDIT, pa.string(), nullable=False))
    fields += [pa.field(embedding_column(k), embedding_type(d), nullable=False) for k, d in dims.items()]
    return pa.schema(fields)


# --- cluster: OUT/cluster/part-*.parquet ------------------------------------------------------------------------
CLUSTER_IDS = "cluster"  # list<int32>: the image's cluster at each level, level 1 (finest) first
BALANCED = "balanced"  # picked by balanced sampling (cluster.target_size)
EMBED_PART = "embed_part"  # cluster: the embed part an image's embeddings are in (curated's plan joins by it)
CLUSTER = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(CLUSTER_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(DISTANCE, pa.float32()),  # 1 - cosine to its level-1 centroid
        pa.field(BALANCED, pa.bool_()),  # picked by balanced sampling (cluster.target_size)
        pa.field(EMBED_PART, pa.int32()),  # the embed part holding its embeddings (OUT/embed/part-NNNNNN.parquet)
    ]
)

# --- curated: OUT/curated/part-*.parquet, the curated pretraining set ----------------------------------------------
REASON_SAMPLE = "sample_retrieval"
REASON_CLUSTER = "cluster_retrieval"
REASON_BALANCED = "balanced_sample"
REASON_SEED = "seed"
REASON_POOL = "deduplicated_pool"  # no seed sets and no balanced sample configured: the whole deduplicated pool


def curated_schema(dim: int | None) -> pa.Schema:
    """Schema of the curated set; ``dim`` of the semantic embedding column (None: no embedding column)."""
    fields = [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(URI, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary(), nullable=False),  # the file's bytes (or re-encoded at curated.max_side)
        pa.field(FORMAT, pa.string()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(REASON, pa.string(), nullable=False),  # sample_retrieval | cluster_retrieval | balanced_sample | seed
        pa.field(SEED_SET, pa.string()),
        pa.field(SCORE, pa.float32()),  # similarity to the seed or centroid that selected it
        pa.field(CLUSTER_IDS, pa.list_(pa.int32())),  # null for seed images
        pa.field(METADATA, pa.string()),  # from ingest: a container record's other members / columns as JSON
    ]
    if dim is not None:
        fields.append(pa.field(EMBEDDING, embedding_type(dim)))
    return pa.schema(fields)


# --- retrieve: OUT/retrieve/part-*.parquet, the images retrieved near each seed set --------------------------------
SEED_SET = "seed_set"  # the seed set's name (its key in retrieve.seed_sets)
SCORE = "score"  # similarity to the seed or centroid that selected the image
SEED_ID = "seed_id"  # retrieve: the seed image an image was retrieved near (null: cluster retrieval)
METHOD = "method"  # retrieve: how the image was retrieved (sample_retrieval | cluster_retrieval)
EMBEDDING = "embedding"  # curated set and seeds: the image's embedding (model curated.embedding)
METHOD_SAMPLE, METHOD_CLUSTER = REASON_SAMPLE, REASON_CLUSTER
RETRIEVED = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(SEED_SET, pa.string(), nullable=False),
        pa.field(SEED_ID, pa.string()),  # the seed image (sample retrieval) or null (cluster retrieval)
        pa.field(SCORE, pa.float32()),  # cosine similarity to the seed, or to the cluster centroid
        pa.field(METHOD, pa.string(), nullable=False),  # sample_retrieval | cluster_retrieval
    ]
)

# A selection for the curated set: why an image is in it (an image picked several ways keeps its strongest reason).
REASON = "reason"  # why the image is in the curated set; status.parquet: why it was removed
SELECTION = pa.schema([(IMAGE_ID, pa.string()), (REASON, pa.string()), (SEED_SET, pa.string()), (SCORE, pa.float32())])

# --- work lists (OUT/<stage>/_listing, one row group per part; no .parquet suffix, so ``*.parquet`` globs skip them)
LISTING = "_listing"
PART = "_part"  # embed's listing: the part an image belongs to
OUTSIDE = "outside"  # ingest's listing: real path of a symlink leading out of the inputs (null: read the file)
INGEST_LISTING = pa.schema([(URI, pa.string()), (OUTSIDE, pa.string())])

# --- side files: every output of a stage that is not one of its parts ------------------------------------------
QUARANTINED = "_quarantined"  # part sub-folder: rows a per-part stage left out (on_part_error=quarantine)
CALIBRATION = "calibration"  # embed's part sub-folder: embeddings of the synthetic copies dedup_copy calibrates on
VIEWS = "views"  # embed's part sub-folder: every image rotated by each of embed.copy_views (dedup_copy's index)
VIEW_PREFIX = "view_rotate"  # the edit of a view: this + the angle, e.g. view_rotate+6
WHITENING_FILE = "whitening.npz"  # dedup_copy: the fitted descriptor post-processing (dedup_relative reuses it)
THRESHOLD_FILE = "threshold.json"  # dedup_copy: the similarity threshold it applied (dedup_relative's default)
PROTECTED_FILE = "protected.parquet"  # dedup_relative: the protected images as ingested (ids, uris, status)
CENTROIDS_FILES = "centroids_level*.npy"  # cluster: the centroids of each level, [K, D] float32


def view_edit(angle: float) -> str:
    """The ``edit`` label of an image's view rotated by ``angle`` degrees (counter-clockwise)."""
    return f"{VIEW_PREFIX}{angle:+g}"


def centroids_file(level: int) -> str:
    """cluster's side file holding the centroids of ``level`` (1: the finest)."""
    return CENTROIDS_FILES.replace("*", str(level))


SEEDS_FILE = "seeds.parquet"  # retrieve: the seed images as ingested, with their seed set and embedding


# --- OUT/status.parquet: one row per input file, the final decision ----------------------------------------------
STATUS = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(URI, pa.string(), nullable=False),
        pa.field(STATUS_COL, pa.string(), nullable=False),  # kept | duplicate | quarantined
        pa.field(REASON, pa.string()),  # quarantine reason, or the dedup stage that removed it
        pa.field(DUP_OF, pa.string()),  # the finally kept image (chains across stages resolved)
    ]
)

# --- demo data: DIR/truth.parquet --------------------------------------------------------------------------------
TRUTH_PATH = "path"  # the file, relative to the demo folder, '/' separated
TRUTH_KIND = "kind"  # what the file is: original | exact_dup | near_dup | broken | seed | heldout | leaked_heldout
TRUTH_COPY_OF = "original"  # copies: path of the original the copy was made from
TRUTH_LABEL = "label"  # digit '0'..'9' for MNIST images, photo name for photos
TRUTH_TRANSFORM = "transform"  # near_dup: the edit applied; broken: how the file was broken
# Kinds of demo files (``kind`` column).
TRUTH_ORIGINAL = "original"
TRUTH_EXACT = "exact_dup"
TRUTH_NEAR = "near_dup"
TRUTH_BROKEN = "broken"
TRUTH_SEED = "seed"
TRUTH_HELDOUT = "heldout"
TRUTH_LEAKED = "leaked_heldout"  # a near copy of a held-out (evaluation) image planted in the pool
TRUTH = pa.schema(
    [
        pa.field(TRUTH_PATH, pa.string(), nullable=False),  # relative to the demo folder, '/' separated
        pa.field(TRUTH_KIND, pa.string(), nullable=False),  # one of the TRUTH_* kinds above
        pa.field(TRUTH_COPY_OF, pa.string()),  # path of the original a copy was made from (copies only)
        pa.field(TRUTH_LABEL, pa.string()),  # digit '0'..'9' for MNIST images, photo name for photos
        pa.field(TRUTH_TRANSFORM, pa.string()),  # near_dup: crop|resize|jpeg|rotate|flip|brightness; broken: how
        pa.field(SEED_SET, pa.string()),  # seed: the seed set's name (folder under seeds/)
    ]
)


def empty(schema: pa.Schema) -> pa.Table:
    """An empty table with ``schema``."""
    return schema.empty_table()
