"""A TFDS builder that "downloads" a local ``.npz`` file, so tests run TFDS's real download-and-prepare path
(download manager, checksums lookup, record writing) offline; ``tfds.testing.mock_data`` skips all of it. TFDS
finds a builder's metadata through its package, hence a package rather than a class inside a test module."""

import numpy as np
import tensorflow_datasets as tfds

SOURCE = None  # path of an .npz with x_train, y_train, x_test, y_test (uint8 8×8×3 images, labels in 0..2)


class BcsTinyImages(tfds.core.GeneratorBasedBuilder):
    """The images and labels of :data:`SOURCE`, split as stored there."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3)),
                                                 "label": tfds.features.ClassLabel(num_classes=3)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        path = dl_manager.download(SOURCE)  # a local path: TFDS copies it as it would fetch a URL
        return {"train": self._generate_examples(path, "train"), "test": self._generate_examples(path, "test")}

    def _generate_examples(self, path, split):
        with np.load(path) as f:
            x, y = f[f"x_{split}"], f[f"y_{split}"]
        for i in range(len(x)):
            yield i, {"image": x[i], "label": int(y[i])}
