"""The backbone pass: images in, embeddings out through store/. Knows images and CLIP, never losses.

Public API (the CLI `dfembed` is a thin layer over it):
    EmbedConfig(model="ViT-L-14", pretrained="openai", feature="proj", ...) -> the embedding settings as data
    extract(images_dir | manifest=..., out="embeddings", config=EmbedConfig(...)) -> summary
    embed.config.config_from_provenance(provenance, workdir) -> the EmbedConfig a store was embedded with
    embed.extract.extract_like(provenance, images, out) -> embed new images exactly as that store was
    embed.backbone.load_backbone(model, pretrained, feature=...) -> Backbone (.encode, .preprocess, .provenance)
    embed.images.load_rgb(path) -> RGB image, or ImageError(kind, message)
    embed.sources.scan_folder(root) / read_manifest(file, columns=..., target_means=...) -> polars rows
    embed.demo.make_demo_images(out_dir) -> a labelled demo face folder
"""

from dfclip.embed.config import EmbedConfig
from dfclip.embed.extract import extract

__all__ = ["EmbedConfig", "extract"]
