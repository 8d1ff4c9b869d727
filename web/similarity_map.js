// Diffusion Feature: click-to-query on DFSimilarityMap. The node's preview shows image A (with the query point)
// beside the heat map over image B; a click on A writes that pixel into the node's x and y widgets and queues the
// graph again. ComfyUI keeps the extractions' results, so only DFSimilarityMap runs: the heat map follows the click.
// The widgets stay the source of truth, so headless (API) workflows never need this file.
import { app } from "../../scripts/app.js";
import { el, widget } from "./layer_picker.js";

const PREVIEW = "similarity preview";

// The image pixel (x, y) of A under a click, or null when the click is on the heat map side or off the picture.
// The preview is drawn with object-fit: contain, so the picture is the element's box scaled and centred.
function pixelOfA(img, preview, event) {
    const rect = img.getBoundingClientRect();
    const total = preview.a_width + preview.b_width;
    const height = Math.max(preview.a_height, preview.b_height);
    const scale = Math.min(rect.width / total, rect.height / height);
    const left = rect.left + (rect.width - total * scale) / 2;
    const top = rect.top + (rect.height - height * scale) / 2;
    const x = (event.clientX - left) / scale;
    const y = (event.clientY - top) / scale;
    if (x < 0 || y < 0 || x > preview.a_width || y > preview.a_height) return null;
    return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
}

function showPreview(node, preview) {
    let img = node.dfSimilarityImage;
    if (!img) {
        img = el("img", { className: "df-similarity-preview", draggable: false });
        Object.assign(img.style, { width: "100%", height: "100%", objectFit: "contain", cursor: "crosshair" });
        img.addEventListener("click", (event) => {
            const current = img.dfPreview;
            const point = current && current.a_width ? pixelOfA(img, current, event) : null;
            if (!point) return;
            widget(node, "x").value = point[0];
            widget(node, "y").value = point[1];
            node.setDirtyCanvas(true, true);
            app.queuePrompt(0, 1);
        });
        const shown = node.addDOMWidget(PREVIEW, "df_similarity_preview", img, {
            getValue: () => "",
            setValue: () => {},
            getMinHeight: () => 160,
            serialize: false,
        });
        shown.serialize = false;
        shown.options.serialize = false;
        node.setSize([Math.max(node.size[0], 420), Math.max(node.size[1], 320)]);
        node.dfSimilarityImage = img;
    }
    img.dfPreview = preview;
    img.dataset.x = preview.x;
    img.dataset.y = preview.y;
    img.src = preview.image;
    node.setDirtyCanvas(true, true);
}

app.registerExtension({
    name: "diffusion_feature.similarity_map",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== "DFSimilarityMap") return;
        const executed = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            executed?.apply(this, arguments);
            const preview = message?.df_similarity?.[0];
            if (preview) showPreview(this, preview);
        };
        const serialize = nodeType.prototype.onSerialize;
        nodeType.prototype.onSerialize = function (data) {  // the 2024 frontend stores every widget's value
            serialize?.apply(this, arguments);
            const i = (this.widgets || []).findIndex((w) => w.name === PREVIEW);
            if (i >= 0 && Array.isArray(data.widgets_values) && data.widgets_values.length > i) {
                data.widgets_values.splice(i, 1);
            }
        };
    },
});
