"""FID: the FID InceptionV3 as a plain module, feature statistics, Frechet distance, stats files."""

from .fid import InceptionFeatures, feature_stats, frechet_distance, load_stats, save_stats
from .inception import FIDInceptionV3, inception_weights_path, load_inception

__all__ = ["FIDInceptionV3", "InceptionFeatures", "feature_stats", "frechet_distance", "inception_weights_path",
           "load_inception", "load_stats", "save_stats"]
