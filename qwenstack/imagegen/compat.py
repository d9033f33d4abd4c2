"""Loading the Qwen-Image Edit pipelines' processor with transformers but without torchvision.

The Edit pipelines' `processor` is a `Qwen2VLProcessor` (image processor + tokenizer). transformers 5.x
also builds its video processor, which needs torchvision, and refuses `video_processor=None` because its
type check looks the None up in VIDEO_PROCESSOR_MAPPING (AttributeError '_extra_content'). torchvision
wheels on PyPI do not load against every torch build (the +cpu one fails with `torchvision::nms does not
exist`), so when torchvision is missing we build the processor ourselves: the PIL image processor and the
tokenizer from the checkpoint's processor/ folder, in a subclass whose type check lets the absent video
processor through. The pipelines never use video. Nothing global is patched.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def image_only_processor(processor_dir: Path) -> Any:
    """A Qwen2VLProcessor with no video processor, from `processor_dir` (preprocessor_config.json plus
    the tokenizer files)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None:  # the video processor: the Qwen-Image pipelines only pass images
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(processor_dir),
                                     tokenizer=AutoTokenizer.from_pretrained(processor_dir))
