"""The backbone pass: images in, embeddings out through store/. Knows images and CLIP, never losses.

Public API (the CLI `dfembed` is a thin layer over it):
    embed.extract.extract(images_dir | manifest=..., out="embeddings", model=..., pretrained=...) -> summary
    embed.backbone.load_backbone(model, pretrained, feature=...) -> Backbone (.encode, .preprocess, .provenance)
    embed.images.load_rgb(path) -> RGB image, or ImageError(kind, message)
    embed.sources.scan_folder(root) / read_manifest(file, columns=..., target_means=...) -> polars rows
    embed.demo.make_demo_images(out_dir) -> a labelled demo face folder
"""
