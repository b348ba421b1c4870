// Captions images in Node.js (≥ 20) with the npm package, streaming the first caption:
//   ./build.sh && node examples/node-caption.mjs MODEL IMAGE...
// MODEL: a hub id (downloaded once into the hub cache under HF_HOME, shared with the `caption`
// CLI), a local 🤗 folder, or a folder URL. Installed from npm, import from 'wasmcap' instead.
import { Captioner } from '../pkg/node.js';

const [model = 'tests/fixtures/tiny-vit-gpt2', ...images] = process.argv.slice(2);
if (images.length === 0) images.push('tests/fixtures/images/astronaut.png');

const captioner = await Captioner.fromPretrained(model, {
  onProgress: (e) => e.file && e.fileDone && process.stderr.write(`${e.file}: ${(e.fileLoaded / 1e6).toFixed(1)} MB\n`),
});
try {
  const run = captioner.caption(images[0], { numBeams: 1 });
  for await (const token of run) process.stdout.write(token.delta);
  process.stdout.write('\n');
  if (images.length > 1) {
    for (const [i, r] of (await captioner.captionMany(images.slice(1)).result).entries()) console.log(`${images[i + 1]}: ${r.text}`);
  }
} finally {
  captioner.dispose();
}
