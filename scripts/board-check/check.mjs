// Opens the board example in headless Chromium and checks what a person would see: the
// queues with their counts, a queue's failed jobs, one job's detail with its error, and the
// worker list. Screenshots go to the directory given as the second argument.
//
//   node check.mjs http://127.0.0.1:PORT OUT_DIR
import { chromium } from 'playwright-core';

const [base, out] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
let failures = 0;
const check = (ok, what) => {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
  if (!ok) failures++;
};
// Waits until the page's text satisfies `test` (the UI loads data after the first paint).
async function waitText(test, what, timeout = 20000) {
  const end = Date.now() + timeout;
  let text = '';
  while (Date.now() < end) {
    text = await page.innerText('body').catch(() => '');
    if (test(text)) return text;
    await page.waitForTimeout(200);
  }
  check(false, `${what} (page text: ${text.slice(0, 400).replace(/\s+/g, ' ')})`);
  return text;
}

try {
  // Overview: both queues, and the counts cards with numbers.
  await page.goto(`${base}/`, { waitUntil: 'domcontentloaded' });
  const num = (t, label) => Number((t.match(new RegExp(label + '\\s+(\\d+)')) || [])[1] || -1);
  // The workers need a moment: wait until every job has ended up somewhere.
  let text = await waitText(t => t.includes('board_email') && t.includes('board_reports')
    && num(t, 'Done Jobs') >= 16 && num(t, 'Failed Jobs') >= 8, 'overview lists the queues and counts');
  check(text.includes('board_email') && text.includes('board_reports'), 'overview lists both queues');
  const done = text.match(/Done Jobs\s+(\d+)/);
  check(done && Number(done[1]) >= 16, `overview counts done jobs (${done && done[1]})`);
  const failed = text.match(/Failed Jobs\s+(\d+)/);
  check(failed && Number(failed[1]) >= 8, `overview counts failed jobs (${failed && failed[1]})`);
  await page.screenshot({ path: `${out}/board-overview.png` });

  // A queue's failed jobs: retrying and dead ones are listed with links to their detail.
  await page.goto(`${base}/queues/board_email/Failed`, { waitUntil: 'domcontentloaded' });
  await page.waitForSelector('a[href*="/tasks/"]', { timeout: 20000 }).catch(() => {});
  const links = await page.$$eval('a[href*="/queues/board_email/tasks/"]', as => as.map(a => a.getAttribute('href')));
  check(links.length >= 4, `the Failed tab lists the queue's failed jobs (${links.length})`);
  text = await page.innerText('body');
  check(text.includes('Failed'), 'failed jobs show their status');
  await page.screenshot({ path: `${out}/board-failed.png` });

  // One job's detail: its arguments, status and attempt. The UI of apalis-board 1.0 has no
  // place for an error text; the same API the page reads carries it in the task's metadata.
  if (links.length > 0) {
    await page.click(`a[href="${links[0]}"]`);
    text = await waitText(t => t.includes('Arguments') && t.includes('@example.com'), "a failed job's detail shows its arguments");
    check(text.includes('Failed') && text.includes('Attempt'), "the job's detail shows its status and attempt");
    check(text.includes('board_email'), "the job's detail shows its queue");
    await page.screenshot({ path: `${out}/board-task.png` });
    const id = links[0].split('/').pop();
    const detail = await page.evaluate(async (id) => {
      const r = await fetch(`/api/v1/queues/board_email/tasks/${id}`);
      return r.json();
    }, id);
    const md = (detail.ctx && detail.ctx.metadata) || {};
    check(/try again later|does not exist/.test(md.last_error || md.dead_error || ''),
      `the job's error is served with it (${JSON.stringify(md)})`);
  }

  // The worker list, from the worker registry.
  await page.goto(`${base}/workers`, { waitUntil: 'domcontentloaded' });
  text = await waitText(t => t.includes('board_email-worker') && t.includes('board_reports-worker'), 'the workers page lists both workers');
  check(text.includes('apalis-pgmq-notify on'), 'workers show where they run');
  await page.screenshot({ path: `${out}/board-workers.png` });
} catch (e) {
  check(false, `unexpected: ${e}`);
} finally {
  await browser.close();
}
console.log(failures === 0 ? 'board check passed' : `board check: ${failures} failed`);
process.exit(failures === 0 ? 0 : 1);
