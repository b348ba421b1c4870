// A local server that answers as the hub's resolve endpoint does, for the CLI's tests
// (tests/hub.rs runs it as `node tests/hub-server.mjs CONFIG`), the Node.js suite and the page
// tests (CORS open, as the hub's is): each
// repository is a fixture folder (with another folder's weights in place of its own, if given);
// `/ORG/NAME/resolve/REVISION/FILE` → 200 with ETag and X-Repo-Commit, weights → 302 to a CDN
// path that honours Range (206), 404 with X-Error-Code for what is not there. A repository's
// `drop` files lose the connection halfway through their first download.
import { createServer } from 'node:http';
import { createHash } from 'node:crypto';
import { appendFileSync, existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const commitOf = (id) => createHash('sha1').update(id).digest('hex');

// `log`: a file that gets each request as a JSON line before it is answered.
export function startHub(repos, { log } = {}) {
  const requests = [];
  const dropped = new Set();
  const fileOf = (repo, name) => {
    if (repo.weights) {
      const own = join(repo.weights, name);
      if (existsSync(own)) return own;
      if (name === 'model.safetensors') return null;
    }
    const path = join(repo.base, name);
    return existsSync(path) ? path : null;
  };
  const server = createServer((req, res) => {
    res.setHeader('Access-Control-Allow-Origin', '*');
    const request = { url: req.url, auth: req.headers.authorization, range: req.headers.range };
    requests.push(request);
    if (log) appendFileSync(log, `${JSON.stringify(request)}\n`);
    const cdn = req.url.match(/^\/cdn\/([\w-]+\/[\w.-]+)\/([\w.-]+)$/);
    if (cdn) {
      const path = repos[cdn[1]] && fileOf(repos[cdn[1]], cdn[2]);
      if (!path) { res.writeHead(404).end(); return; }
      const bytes = readFileSync(path);
      const from = Number(req.headers.range?.match(/bytes=(\d+)-/)?.[1] ?? 0);
      const headers = { 'Content-Length': String(bytes.length - from), 'Accept-Ranges': 'bytes' };
      if (req.headers.range) headers['Content-Range'] = `bytes ${from}-${bytes.length - 1}/${bytes.length}`;
      res.writeHead(req.headers.range ? 206 : 200, headers);
      const drop = repos[cdn[1]].drop;
      if (drop?.includes(cdn[2]) && !dropped.has(req.url)) {
        dropped.add(req.url);
        res.write(bytes.subarray(from, from + Math.floor((bytes.length - from) / 2)), () => res.destroy());
        return;
      }
      res.end(bytes.subarray(from));
      return;
    }
    const m = req.url.match(/^\/([\w-]+\/[\w.-]+)\/resolve\/([^/]+)\/([\w.-]+)$/);
    const repo = m && repos[m[1]];
    if (!repo) { res.writeHead(401, { 'X-Error-Code': 'RepositoryNotFound' }).end(); return; }
    const commit = commitOf(m[1]);
    if (![commit, 'main'].includes(decodeURIComponent(m[2]))) { res.writeHead(404, { 'X-Error-Code': 'RevisionNotFound' }).end(); return; }
    const path = fileOf(repo, m[3]);
    if (!path) { res.writeHead(404, { 'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': commit }).end(); return; }
    const bytes = readFileSync(path);
    const etag = `"${createHash('sha256').update(bytes).digest('hex')}"`;
    if (/\.(safetensors|bin)$/.test(m[3])) {
      res.writeHead(302, { Location: `/cdn/${m[1]}/${m[3]}`, 'X-Repo-Commit': commit, 'X-Linked-Etag': etag, 'Content-Length': '0' }).end();
      return;
    }
    res.writeHead(200, { ETag: etag, 'X-Repo-Commit': commit, 'Content-Length': String(bytes.length) }).end(bytes);
  });
  return new Promise((ok) => server.listen(0, '127.0.0.1', () => ok({ server, requests, url: `http://127.0.0.1:${server.address().port}/` })));
}

// As a program: CONFIG is JSON { repos, log }; prints { url, commits } as one line, and serves
// until its stdin closes (the test that started it is done).
if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { repos, log } = JSON.parse(process.argv[2]);
  const { url } = await startHub(repos, { log });
  const commits = Object.fromEntries(Object.keys(repos).map((id) => [id, commitOf(id)]));
  process.stdout.write(`${JSON.stringify({ url, commits })}\n`);
  process.stdin.on('end', () => process.exit(0)).resume();
}
