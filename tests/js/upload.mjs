// Upload a file to vodstack's tus endpoint with the stock tus-js-client, as a Node (or, through
// Uppy, a browser) app would. Run by tests/integration/test_tus_js.py.
//
//   node upload.mjs ENDPOINT FILE --key KEY [--chunk BYTES] [--resume UPLOAD_URL]
//                   [--stop-after BYTES]
//
// ENDPOINT is the creation URL (http://host:port/v1/tus/). `--chunk` sets chunkSize, so the file
// goes in several PATCHes (the first chunk rides on the creation POST: creation-with-upload).
// Failed requests are retried (tus-js-client asks the server for its offset with HEAD and
// resumes). `--stop-after` aborts once that many bytes were sent, like a closed browser tab;
// `--resume` continues an upload created earlier. Prints one JSON line:
//   {"state": "done"|"stopped", "url": ..., "videoId": ..., "retries": n, "patches": n}
import fs from 'node:fs'
import path from 'node:path'
import tus from 'tus-js-client'

function parseArgs(argv) {
  const [endpoint, file, ...rest] = argv
  const opts = { endpoint, file, key: null, chunk: 512 * 1024, resume: null, stopAfter: null }
  for (let i = 0; i < rest.length; i += 2) {
    const [flag, value] = [rest[i], rest[i + 1]]
    if (flag === '--key') opts.key = value
    else if (flag === '--chunk') opts.chunk = Number(value)
    else if (flag === '--resume') opts.resume = value
    else if (flag === '--stop-after') opts.stopAfter = Number(value)
    else throw new Error(`unknown flag ${flag}`)
  }
  if (!endpoint || !file || !opts.key) {
    throw new Error('usage: node upload.mjs ENDPOINT FILE --key KEY [--chunk N] [--resume URL]')
  }
  return opts
}

const opts = parseArgs(process.argv.slice(2))
const report = { state: null, url: null, videoId: null, retries: 0, patches: 0 }
let finished = false

function finish(state) {
  if (finished) return
  finished = true
  report.state = state
  process.stdout.write(`${JSON.stringify(report)}\n`)
  process.exit(0)
}

const upload = new tus.Upload(fs.createReadStream(opts.file), {
  endpoint: opts.endpoint,
  uploadUrl: opts.resume,
  chunkSize: opts.chunk,
  uploadDataDuringCreation: true,
  retryDelays: [0, 100, 300, 1000],
  headers: { Authorization: `Bearer ${opts.key}` },
  metadata: { filename: path.basename(opts.file), filetype: 'video/mp4' },
  storeFingerprintForResuming: false,
  onShouldRetry(err, attempt, options) {
    report.retries += 1
    return tus.defaultOptions.onShouldRetry(err, attempt, options)
  },
  onBeforeRequest(req) {
    if (req.getMethod() === 'PATCH') report.patches += 1
  },
  onAfterResponse(req, res) {
    const vid = res.getHeader('X-Video-Id')
    if (req.getMethod() === 'POST' && vid) report.videoId = vid
  },
  onUploadUrlAvailable() {
    report.url = upload.url
  },
  onProgress(sent) {
    if (opts.stopAfter !== null && sent >= opts.stopAfter && !finished) {
      report.url = upload.url
      upload.abort(false).then(() => finish('stopped'))
    }
  },
  onError(err) {
    process.stderr.write(`upload failed: ${err}\n`)
    process.exit(1)
  },
  onSuccess() {
    report.url = upload.url
    finish('done')
  },
})
upload.start()
