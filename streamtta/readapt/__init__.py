"""Re-adaptation after a confirmed shift, and the meta-training of its starting point.

Re-adaptation is not a detector: the shift monitor (:mod:`streamtta.detectors.shift`) confirms a shift,
and this package answers it.

* :class:`ReAdapter` (:mod:`~streamtta.readapt.readapter`): the onset split (process the batch holding
  the change point again, in two parts) and the opt-in meta restart;
* :func:`meta_train` (:mod:`~streamtta.readapt.meta_train`): first-order MAML / Reptile over synthetic
  shift tasks, giving the meta-initialisation the restart starts from;
* :func:`save_meta_init` / :func:`load_meta_init` (:mod:`~streamtta.readapt.meta_init`): its files.
"""
from streamtta.readapt.meta_init import META_INIT_SUFFIX, load_meta_init, meta_init_path, save_meta_init
from streamtta.readapt.meta_train import meta_train, meta_train_cli, shuffled_outliers
from streamtta.readapt.params import adaptable_parameter_names
from streamtta.readapt.readapter import ReAdapter, Reprocessed
from streamtta.readapt.restart import prediction_proxies

__all__ = [
    "ReAdapter", "Reprocessed", "prediction_proxies",
    "meta_train", "meta_train_cli", "shuffled_outliers", "adaptable_parameter_names",
    "META_INIT_SUFFIX", "load_meta_init", "meta_init_path", "save_meta_init",
]
