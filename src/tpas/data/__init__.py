"""Datasets: one in-memory form (records) and readers for every on-disk format."""

from tpas.data.records import Behaviour, EvalSet, GalleryImage, ImageText, Query, TrainSet

__all__ = ["Behaviour", "EvalSet", "GalleryImage", "ImageText", "Query", "TrainSet"]
