// Drive cors_page.html in headless Chromium (Debian's /usr/bin/chromium, through playwright-core:
// no browser download). Run by tests/integration/test_cors.py.
//
//   node browser_upload.mjs CONFIG_JSON
//
// CONFIG_JSON: {"chromium": path, "api": control URL, "key": API key, "chunkSize": bytes,
//               "timeoutMs": ms, "pages": {name: page URL, ...}}
// Each page is loaded in a fresh page and window.vodUpload runs there. Prints one JSON line
// {name: report, ...}; exits 2 if the whole run outlasts timeoutMs (the browser goes with it).
import { chromium } from 'playwright-core'

const cfg = JSON.parse(process.argv[2])
const deadline = setTimeout(() => {
  process.stderr.write(`browser run timed out after ${cfg.timeoutMs} ms\n`)
  process.exit(2)
}, cfg.timeoutMs)

const browser = await chromium.launch({
  executablePath: cfg.chromium,
  headless: true,
  // root in a container: no user namespace sandbox; small /dev/shm
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
  timeout: 30000,
})
try {
  const results = {}
  for (const [name, url] of Object.entries(cfg.pages)) {
    const page = await browser.newPage()
    page.on('console', (m) => process.stderr.write(`[${name}] console.${m.type()}: ${m.text()}\n`))
    page.on('pageerror', (e) => process.stderr.write(`[${name}] page error: ${e}\n`))
    await page.goto(url, { timeout: 15000 })
    results[name] = await page.evaluate(
      (args) => window.vodUpload(args),
      { api: cfg.api, key: cfg.key, chunkSize: cfg.chunkSize },
    )
    await page.close()
  }
  process.stdout.write(`${JSON.stringify(results)}\n`)
} finally {
  await browser.close()
  clearTimeout(deadline)
}
