// Greedy LLaVA generation with transformers.js on a local model folder; prints one JSON line.
// usage: node llava_generate.mjs MODEL_DIR IMAGE PROMPT_JSON [NEW_TOKENS] [DTYPE_JSON]
// PROMPT_JSON: {"text": "..."} used as it is, or {"messages": [...]} rendered by the folder's chat template.
// DTYPE_JSON: a per-graph dtype object; absent: what the folder's config.json selects.
import { AutoProcessor, LlavaForConditionalGeneration, RawImage, env } from "@huggingface/transformers";

const [modelDir, imagePath, promptJson, newTokens = "16", dtypeJson] = process.argv.slice(2);
if (!modelDir || !imagePath || !promptJson) {
  console.error("usage: node llava_generate.mjs MODEL_DIR IMAGE PROMPT_JSON [NEW_TOKENS] [DTYPE_JSON]");
  process.exit(2);
}
env.allowRemoteModels = false;
env.localModelPath = "";

const options = { local_files_only: true };
const processor = await AutoProcessor.from_pretrained(modelDir, options);
const model = await LlavaForConditionalGeneration.from_pretrained(modelDir, {
  ...options,
  device: "cpu",
  ...(dtypeJson ? { dtype: JSON.parse(dtypeJson) } : {}),
});
const prompt = JSON.parse(promptJson);
const text = prompt.text ?? processor.apply_chat_template(prompt.messages, { add_generation_prompt: true });
const image = await RawImage.read(imagePath);
const inputs = await processor(image, text);
const output = await model.generate({ ...inputs, max_new_tokens: Number(newTokens), do_sample: false });
const promptLength = inputs.input_ids.dims.at(-1);
const ids = Array.from(output.tolist()[0].slice(promptLength), Number);
console.log(JSON.stringify({ text, prompt_ids: Array.from(inputs.input_ids.tolist()[0], Number), ids }));
await model.dispose();
