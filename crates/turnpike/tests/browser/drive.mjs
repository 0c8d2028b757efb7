// Drives a real browser (Debian's chromium or firefox-esr, through
// puppeteer-core: no browser download) through one of turnpike's pages and
// prints what it saw as one JSON line. The Rust tests decide pass or fail.
//
//   node drive.mjs BROWSER ice URL TOKEN SHOT.png
//   node drive.mjs BROWSER dashboard URL TOKEN SHOT.png RELAYED
//   node drive.mjs BROWSER fleet URL TOKEN SHOT.png NODE USER
//   node drive.mjs BROWSER report FILE.html SHOT.png
import puppeteer from 'puppeteer-core';

const [browserName, what, ...args] = process.argv.slice(2);

function launchOptions(name) {
  if (name === 'firefox') {
    return {
      browser: 'firefox',
      executablePath: process.env.FIREFOX || '/usr/bin/firefox-esr',
      headless: true,
      extraPrefsFirefox: {
        // Every host address, not only the default route's.
        'media.peerconnection.ice.default_address_only': false,
        'network.captive-portal-service.enabled': false,
        'app.update.enabled': false,
      },
    };
  }
  return {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // Root in CI needs --no-sandbox; the rest keep a closed network quiet.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  };
}

async function ice(page, [url, token, shot]) {
  await page.goto(url);
  if (token) await page.evaluate((t) => { document.getElementById('token').value = t; }, token);
  await page.click('#run');
  await page.waitForFunction(() => document.body.dataset.state === 'done', { timeout: 150000 });
  const result = await page.evaluate(() => ({
    ...window.iceResult,
    verdictText: document.getElementById('verdict').textContent,
    advice: [...document.querySelectorAll('#advice li')].map((li) => li.textContent),
    rows: [...document.querySelectorAll('#results tbody tr')].map((tr) => ({ transport: tr.dataset.transport, verdict: tr.dataset.verdict })),
  }));
  await page.screenshot({ path: shot, fullPage: true });
  return result;
}

async function dashboard(page, [url, token, shot, relayed]) {
  page.on('dialog', (d) => d.accept());
  await page.goto(url);
  await page.type('#token', token);
  await page.click('#signin button');
  const row = `#sessions tr[data-relayed="${relayed}"]`;
  await page.waitForSelector(row, { timeout: 20000 });
  // Two more updates: the page keeps streaming.
  const before = await page.evaluate(() => Number(document.body.dataset.updates));
  await page.waitForFunction((n) => Number(document.body.dataset.updates) >= n + 2, { timeout: 10000 }, before);
  const shown = await page.evaluate(() => ({
    tiles: Object.fromEntries([...document.querySelectorAll('.tile')].map((t) => [t.dataset.key, t.querySelector('.v').textContent])),
    users: [...document.querySelectorAll('#users tbody tr td:first-child')].map((td) => td.textContent),
    node: document.getElementById('node-state').textContent,
  }));
  await page.screenshot({ path: shot, fullPage: true });
  await page.click(`${row} button`);
  await page.waitForSelector(row, { hidden: true, timeout: 10000 });
  const after = await page.evaluate(() => document.querySelector('.tile[data-key="allocations"] .v').textContent);
  return { seen: true, removed: true, ...shown, allocationsAfter: after };
}

// The fleet view: every node's row, a user's sessions found on every
// node, NODE drained and undrained from its row (held drained for 2 s so
// the test sees it from outside), then the user's sessions deleted
// everywhere.
async function fleet(page, [url, token, shot, node, user]) {
  page.on('dialog', (d) => d.accept());
  await page.goto(url);
  await page.type('#token', token);
  await page.click('#signin button');
  await page.waitForFunction(() => document.querySelectorAll('#fleet-nodes tbody tr').length === 3, { timeout: 20000 });
  // A row is written from a heartbeat: wait for one more poll so every
  // node has beaten with its load.
  const polls = await page.evaluate(() => Number(document.body.dataset.fleetUpdates));
  await page.waitForFunction((n) => Number(document.body.dataset.fleetUpdates) >= n + 1, { timeout: 10000 }, polls);
  const rows = () => [...document.querySelectorAll('#fleet-nodes tbody tr')].map((tr) => ({
    node: tr.dataset.node, draining: tr.dataset.draining, health: tr.dataset.health,
    cells: [...tr.querySelectorAll('td')].map((td) => td.textContent),
  }));
  const nodes = await page.evaluate(rows);
  await page.type('#fleet-user', user);
  await page.click('#fleet-search button[type="submit"]');
  await page.waitForFunction((u) => document.getElementById('fleet-search-state').dataset.searched === u, { timeout: 10000 }, user);
  const found = await page.evaluate(() => [...document.querySelectorAll('#fleet-sessions tbody tr')]
    .map((tr) => ({ node: tr.dataset.node, relayed: tr.dataset.relayed })));
  const searchText = await page.evaluate(() => document.getElementById('fleet-search-state').textContent);
  const row = `#fleet-nodes tr[data-node="${node}"]`;
  await page.click(`${row} button`);
  await page.waitForSelector(`${row}[data-draining="true"]`, { timeout: 10000 });
  const drainedState = await page.evaluate((r) => document.querySelector(r).textContent, row);
  await page.screenshot({ path: shot, fullPage: true });
  await new Promise((res) => setTimeout(res, 2000));
  await page.click(`${row} button`);
  await page.waitForSelector(`${row}[data-draining="false"]`, { timeout: 10000 });
  await page.click('#fleet-delete');
  await page.waitForFunction(() => document.querySelectorAll('#fleet-sessions tbody tr').length === 0, { timeout: 10000 });
  return { nodes, found, searchText, drainedState, undrained: true, deleted: true };
}

async function report(page, [file, shot]) {
  await page.goto('file://' + file);
  const r = await page.evaluate(() => ({
    capacity: document.getElementById('capacity')?.dataset.calls,
    headline: document.getElementById('capacity')?.textContent,
    charts: document.querySelectorAll('svg.chart').length,
    plotted: [...document.querySelectorAll('svg.chart polyline.series')].filter((p) => p.getAttribute('points').trim().length > 0).length,
    chartWidths: [...document.querySelectorAll('svg.chart')].map((s) => s.getBoundingClientRect().width),
    steps: document.querySelectorAll('#steps tbody tr').length,
  }));
  await page.screenshot({ path: shot, fullPage: true });
  return r;
}

const browser = await puppeteer.launch(launchOptions(browserName));
let out;
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1100, height: 800 });
  const logs = [];
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push('page error: ' + e.message));
  try {
    out = await { ice, dashboard, fleet, report }[what](page, args);
  } catch (e) {
    out = { error: e.message };
  }
  out.browser = browserName;
  out.version = await browser.version();
  out.logs = logs;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
