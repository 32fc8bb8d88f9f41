"""Prompt templates: OpenAI CLIP's 80 ImageNet templates and FAMix's 20 style names.

The templates are the prompt ensemble OpenAI published with CLIP for zero-shot ImageNet
classification (the "80 templates" MaskCLIP, SCLIP, ClearCLIP, NACLIP and ProxyCLIP average
over); ``{}`` is replaced by a class name. The style names are the 20 "random styles" FAMix
(Fahes et al., CVPR 2024) draws from when it mines language-driven styles.
"""

from __future__ import annotations

OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# One neutral template, for quick runs and tests where 80 text passes per class cost too much.
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

FAMIX_STYLES: tuple[str, ...] = (
    "Ethereal Mist style",
    "Cyberpunk Cityscape style",
    "Rustic Charm style",
    "Galactic Fantasy style",
    "Pastel Dreams style",
    "Dystopian Noir style",
    "Whimsical Wonderland style",
    "Urban Grit style",
    "Enchanted Forest style",
    "Retro Futurism style",
    "Monochrome Elegance style",
    "Vibrant Graffiti style",
    "Haunting Shadows style",
    "Steampunk Adventures style",
    "Watercolor Serenity style",
    "Industrial Chic style",
    "Cosmic Voyage style",
    "Pop Art Popularity style",
    "Abstract Symphony style",
    "Magical Realism style",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet": OPENAI_IMAGENET_TEMPLATES,
    "single": SINGLE_TEMPLATE,
}


def resolve_templates(templates: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A template set by name (:data:`TEMPLATE_SETS`) or a list of ``{}`` templates."""
    from pivotseg.errors import ConfigError

    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ConfigError(
                f"templates {templates!r}: unknown set; use one of {', '.join(TEMPLATE_SETS)} "
                "or a list of strings containing '{}'"
            )
        return TEMPLATE_SETS[templates]
    templates = tuple(templates)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(
            f"templates: every template needs a '{{}}' for the class name (got {bad[:1] or '[]'})"
        )
    return templates
