"""Image files for the jobs: the model package's one reader and decoder (`gsva.images`).

Every job stage that needs pixels (prepare, annotate, train, the score report) imports them from here;
`gsva.images` holds the implementation so that `python -m gsva predict` reads files the same way.
"""

from gsva.images import (  # noqa: F401 - the jobs' image API, one implementation
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageError,
    ImageLimits,
    check_image_file,
    decode_image,
    read_image_bytes,
)
