"""A Gradio web app on a saved adapter: `vlm-adapters serve --adapter DIR_OR_REPO`.

Upload one or several images (any format `load_image` reads, DICOM included), edit the candidate
labels, and see each label's probability, the prediction (or "not sure" below a threshold), a
heatmap of the image regions behind the top label (`model.explain`), a description and the answer
to a free question. The same app runs as a Hugging Face Space from an
adapter folder saved with `save_pretrained(..., with_app=True)`. Imported only by `serve` and that
Space file, so the library never loads Gradio otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app runs offline; nothing is reported

import gradio as gr  # noqa: E402 - after the environment above
from PIL import Image  # noqa: E402

from .images import IMAGE_SUFFIXES, ImageLoadError, is_image_file, load_image  # noqa: E402

MAX_IMAGES = 64  # a CPU answers a few images a second: more in one request would look hung
NOT_SURE = "not sure"


def read_uploads(paths: Sequence[str] | None, max_upload_mb: float) -> list[tuple[str, Image.Image]]:
    """(file name, RGB image) per upload; any oversized, non-image or unreadable file refuses the
    whole request with a message naming every such file and why."""
    if not paths:
        raise gr.Error("Upload one or more images first.")
    if len(paths) > MAX_IMAGES:
        raise gr.Error(f"{len(paths)} files were uploaded; the app takes at most {MAX_IMAGES} at a time.")
    images, problems = [], []
    for path in paths:
        name = os.path.basename(path)
        size_mb = os.path.getsize(path) / 2**20
        if size_mb > max_upload_mb:
            problems.append(f"{name} is {size_mb:.1f} MB; the limit is {max_upload_mb:g} MB.")
        elif not is_image_file(path):
            suffix = os.path.splitext(name)[1] or "no suffix"
            problems.append(f"{name} is not an image file ({suffix}); upload {_accepted()}.")
        else:
            try:
                images.append((name, load_image(path)))
            except ImageLoadError as err:
                problems.append(str(err).replace(path, name))
    if problems:
        raise gr.Error(" ".join(problems))
    return images


def _accepted() -> str:
    common = [".png", ".jpg", ".jpeg", ".tif", ".bmp", ".webp", ".dcm"]
    return ", ".join(s for s in common if s in IMAGE_SUFFIXES) + " or another image format"


def parse_labels(text: str) -> list[str]:
    labels = [label.strip() for label in (text or "").replace("\n", ",").split(",") if label.strip()]
    if not labels:
        raise gr.Error("Enter at least one label (comma-separated), e.g. normal, pneumonia.")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise gr.Error(f"Each label must appear once; {', '.join(duplicates)} appear more than once.")
    return labels


def prediction_text(probs: dict[str, float], abstain_below: float) -> str:
    """The top label and its probability, or "not sure" when that probability is under the threshold."""
    top, probability = max(probs.items(), key=lambda item: item[1])
    if probability < abstain_below:
        return f"{NOT_SURE} (top label {top} at {probability:.1%} is below {abstain_below:.0%})"
    return f"{top} ({probability:.1%})"


class AppModel:
    """The callbacks of the app on one loaded model; Gradio calls them in its worker threads, one
    event at a time (all events share one concurrency slot, see `build_app`)."""

    def __init__(self, model: Any, max_upload_mb: float) -> None:
        self.model, self.max_upload_mb = model, max_upload_mb

    def preview(self, paths: list[str] | None) -> tuple[Any, ...]:
        """The uploads as the model sees them (DICOM windowed, 16-bit stretched), the first one
        selected, and the results of earlier uploads cleared."""
        images = read_uploads(paths, self.max_upload_mb) if paths else []
        return [(image, name) for name, image in images], 0, [], None, "", None, "", "", None, ""

    def classify(
        self, paths: list[str] | None, labels_text: str, abstain_below: float, selected: int
    ) -> tuple[dict[str, float], str, list[list[Any]], list[dict[str, float]]]:
        """Probabilities of the selected image, the prediction per image (a table), every image's probabilities."""
        images = read_uploads(paths, self.max_upload_mb)
        ranked = self.model.classify([image for _, image in images], parse_labels(labels_text))
        table = [
            [name, prediction_text(probs, abstain_below), round(max(probs.values()), 4)]
            for (name, _), probs in zip(images, ranked)
        ]
        index = _index(selected, images)
        return ranked[index], f"{images[index][0]}: {table[index][1]}", table, ranked

    def explain(self, paths: list[str] | None, labels_text: str, selected: int) -> tuple[Image.Image, str]:
        """The selected image with the heatmap of its top label over it, and a caption naming both."""
        images = read_uploads(paths, self.max_upload_mb)
        name, image = images[_index(selected, images)]
        explanation = self.model.explain(image, labels=parse_labels(labels_text))
        return explanation.overlay(), (
            f"{name}: why {explanation.label} ({explanation.score:.1%}); red = regions that raised its score most"
        )

    def describe(self, paths: list[str] | None, selected: int) -> str:
        images = read_uploads(paths, self.max_upload_mb)
        return self.model.describe(images[_index(selected, images)][1])

    def ask(self, paths: list[str] | None, question: str, selected: int) -> str:
        if not (question or "").strip():
            raise gr.Error("Type a question about the image first.")
        images = read_uploads(paths, self.max_upload_mb)
        return self.model.describe(images[_index(selected, images)][1], prompt=question.strip())


def _index(selected: int | None, images: list[Any]) -> int:
    return selected if isinstance(selected, int) and 0 <= selected < len(images) else 0


def show_selected(
    ranked: list[dict[str, float]] | None, paths: list[str] | None, abstain_below: float, evt: gr.SelectData
) -> tuple[int, dict[str, float] | None, str]:
    """A click on a gallery image selects it: its probabilities (kept from the last classify) are shown."""
    index = evt.index if isinstance(evt.index, int) else 0
    if not ranked or index >= len(ranked) or not paths:
        return index, None, ""
    return index, ranked[index], f"{os.path.basename(paths[index])}: {prediction_text(ranked[index], abstain_below)}"


def build_app(
    model: Any, labels: Sequence[str] | None = None, max_upload_mb: float = 20.0, title: str = ""
) -> gr.Blocks:
    """The Blocks app on a loaded model; `labels` default to the adapter's."""
    app = AppModel(model, max_upload_mb)
    labels = list(labels or model.config.labels)
    model_event = {"concurrency_id": "model", "concurrency_limit": 1}  # inference state is per model
    with gr.Blocks(title=title or "vlm_adapters") as demo:
        gr.Markdown(f"# {title or 'vlm_adapters'}\nUpload images, then classify, describe or ask about them. "
                    f"Runs locally; uploads up to {max_upload_mb:g} MB each.")
        selected, ranked = gr.State(0), gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(file_count="multiple", label="Images (PNG, JPEG, TIFF, DICOM, ...)", elem_id="files")
                labels_box = gr.Textbox(", ".join(labels), label="Labels (comma-separated)", elem_id="labels")
                threshold = gr.Slider(0.0, 1.0, 0.0, step=0.01, elem_id="threshold",
                                      label='Say "not sure" when the top probability is below (0: never)')
                classify_button = gr.Button("Classify", variant="primary", elem_id="classify")
                explain_button = gr.Button("Explain (heatmap of the top label)", elem_id="explain")
                describe_button = gr.Button("Describe", elem_id="describe")
                question = gr.Textbox(label="Ask a question about the selected image", elem_id="question")
                ask_button = gr.Button("Ask", elem_id="ask")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images as the model sees them (click one to select it)", columns=4,
                                     height=240, object_fit="contain", allow_preview=False, elem_id="gallery")
                prediction = gr.Textbox(label="Prediction (selected image)", interactive=False, elem_id="prediction")
                probabilities = gr.Label(label="Label probabilities (selected image)", elem_id="probabilities")
                heatmap = gr.Image(label="Heatmap (selected image)", type="pil", format="png", interactive=False,
                                   elem_id="heatmap")  # PNG: the overlay's pixels reach the browser unchanged
                explained = gr.Textbox(label="Explained", interactive=False, elem_id="explained")
                table = gr.Dataframe(headers=["image", "prediction", "top probability"], label="All images",
                                     interactive=False, elem_id="table")
                description = gr.Textbox(
                    label="Description (selected image)", interactive=False, elem_id="description"
                )
                answer = gr.Textbox(label="Answer (selected image)", interactive=False, elem_id="answer")
        results = [ranked, probabilities, prediction, table, description, answer, heatmap, explained]
        files.change(app.preview, files, [gallery, selected, *results], api_name=False)
        gallery.select(show_selected, [ranked, files, threshold], [selected, probabilities, prediction], api_name=False)
        classify_button.click(app.classify, [files, labels_box, threshold, selected],
                              [probabilities, prediction, table, ranked], api_name="classify", **model_event)
        explain_button.click(app.explain, [files, labels_box, selected], [heatmap, explained], api_name="explain",
                             **model_event)
        describe_button.click(app.describe, [files, selected], description, api_name="describe", **model_event)
        ask_button.click(app.ask, [files, question, selected], answer, api_name="ask", **model_event)
        question.submit(app.ask, [files, question, selected], answer, api_name=False, **model_event)
    return demo


def serve(
    model: Any,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    labels: Sequence[str] | None = None,
    max_upload_mb: float = 20.0,
    title: str = "",
) -> None:
    """Serve the app on a loaded model until interrupted; binds to `host` (localhost unless told), on
    `port` (None: $GRADIO_SERVER_PORT, else the first free one from 7860). Gradio itself refuses
    uploads over `max_upload_mb` before they reach the disk."""
    demo = build_app(model, labels, max_upload_mb, title=title)
    demo.queue().launch(server_name=host, server_port=port, max_file_size=int(max_upload_mb * 2**20), show_error=True)
