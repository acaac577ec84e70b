"""The default decode limit for images and masks, apart from the readers (which need torch): the CLI shows it in
`--help`, and `hsnet-deploy --help` must not import torch (or, through torch, cuda-python where it is installed)."""

DEFAULT_MAX_MEGAPIXELS = 40.0  # a 48 MP phone photo in JPEG still decodes (reduced); a 150 MP PNG does not
