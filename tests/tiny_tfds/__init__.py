"""A TFDS dataset for tests, as TFDS datasets are laid out: a builder module inside a package."""
