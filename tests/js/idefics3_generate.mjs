// Greedy Idefics3 / SmolVLM generation with transformers.js on a local model folder; prints one JSON line.
// usage: node idefics3_generate.mjs MODEL_DIR IMAGES PROMPT_JSON [NEW_TOKENS] [DTYPE_JSON] [PIXELS_OUT]
// IMAGES: one image path, or a JSON array of paths (several images in the one prompt, in order).
// PROMPT_JSON: {"text": "..."} used as it is, or {"messages": [...]} rendered by the folder's chat template.
// DTYPE_JSON: a per-graph dtype object, or "" for what the folder's config.json selects.
// PIXELS_OUT: where to write the processor's pixel_values (float32, little-endian, row-major; dims in the JSON).
import { writeFileSync } from "node:fs";
import {
  AutoConfig, AutoProcessor, Idefics3ForConditionalGeneration, RawImage, SmolVLMForConditionalGeneration, env,
} from "@huggingface/transformers";

const [modelDir, imagesArg, promptJson, newTokens = "16", dtypeJson = "", pixelsOut = ""] = process.argv.slice(2);
if (!modelDir || !imagesArg || !promptJson) {
  console.error("usage: node idefics3_generate.mjs MODEL_DIR IMAGES PROMPT_JSON [NEW_TOKENS] [DTYPE_JSON] [PIXELS_OUT]");
  process.exit(2);
}
env.allowRemoteModels = false;
env.localModelPath = "";

const options = { local_files_only: true };
const config = await AutoConfig.from_pretrained(modelDir, options);
const Model = config.model_type === "smolvlm" ? SmolVLMForConditionalGeneration : Idefics3ForConditionalGeneration;
const processor = await AutoProcessor.from_pretrained(modelDir, options);
const model = await Model.from_pretrained(modelDir, {
  ...options,
  device: "cpu",
  ...(dtypeJson ? { dtype: JSON.parse(dtypeJson) } : {}),
});
const prompt = JSON.parse(promptJson);
const text = prompt.text ?? processor.apply_chat_template(prompt.messages, { add_generation_prompt: true });
const paths = imagesArg.startsWith("[") ? JSON.parse(imagesArg) : [imagesArg];
const images = await Promise.all(paths.map((path) => RawImage.read(path)));
const inputs = await processor(text, images);
if (pixelsOut) {
  const data = inputs.pixel_values.data;
  writeFileSync(pixelsOut, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
}
const output = await model.generate({ ...inputs, max_new_tokens: Number(newTokens), do_sample: false });
const promptLength = inputs.input_ids.dims.at(-1);
const ids = Array.from(output.tolist()[0].slice(promptLength), Number);
console.log(JSON.stringify({
  text,
  prompt_ids: Array.from(inputs.input_ids.tolist()[0], Number),
  ids,
  pixel_dims: inputs.pixel_values.dims,
  rows: inputs.rows,
  cols: inputs.cols,
}));
await model.dispose();
