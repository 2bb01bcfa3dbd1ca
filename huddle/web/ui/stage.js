// The stage: where the tiles go (speaker or gallery layout, pages, pins) and how large each remote video is
// shown, which the client turns into `video_sizes` (adaptive stream). initStage(client) starts it.
//
// Gallery: everyone the same size, the largest tiles that fit the stage, GALLERY_PAGE_SIZE to a page (page
//   buttons when there are more); with two people, Meet-style: the other person fills the stage and we are a
//   picture-in-picture in its corner.
// Speaker: one large tile (.stage: the pinned participant, else whoever speaks or spoke last) beside a strip
//   of small thumbnails of everyone else, which scrolls when they do not all fit.
// Until the user picks one (#layout-speaker, #layout-gallery), calls of three or more are in speaker view.
// Tiles always stay in join order (ours first); the layout only moves them between #grid and #strip.
// Screen shares: a remote screen is large on the stage (over the speaker) while it is the latest one shared,
// unless the viewer pinned something else; a share that starts turns gallery view into speaker view. Our own
// screen's preview is never large unless nothing else is there.

import { $ } from './dom.js';
import { isOwnTile, onTileChange, tiles, updatePinButton } from './tiles.js';

const GALLERY_PAGE_SIZE = 25;
const THUMB_ASPECT = 16 / 9;

const ui = {
  grid: $('#grid'),
  strip: $('#strip'),
  pager: $('#pager'),
  pagePrev: $('#page-prev'),
  pageNext: $('#page-next'),
  pageLabel: $('#page-label'),
  layoutSpeaker: $('#layout-speaker'),
  layoutGallery: $('#layout-gallery'),
};

let huddle = null; // the HuddleClient (initStage)

const view = {
  choice: null, // 'speaker' | 'gallery' once the user picked one; null: by the number of people
  pinned: null, // participant id
  page: 0, // gallery page
  lastSpeaker: null, // the last remote participant who was the active speaker
  screens: [], // keys of the remote screens shared, the latest last
};

function remoteIds() {
  return [...tiles.keys()].filter((id) => !isOwnTile(id));
}

function currentLayout() {
  return view.choice || (remoteIds().length >= 2 || view.screens.length > 0 ? 'speaker' : 'gallery');
}

/** Who is large in speaker view: pinned, else the latest screen, else speaking (not us), else spoke last... */
function stageId() {
  if (view.pinned && tiles.has(view.pinned)) return view.pinned;
  if (view.screens.length > 0) return view.screens[view.screens.length - 1];
  const speaker = huddle.activeSpeaker;
  if (speaker && speaker !== huddle.self?.id && tiles.has(speaker)) return speaker;
  if (view.lastSpeaker && tiles.has(view.lastSpeaker)) return view.lastSpeaker;
  return remoteIds()[0] || (tiles.has('local') ? 'local' : null);
}

/** The tile that fills a cellW x cellH cell best, its shape kept between 3:4 and 16:9 (videos are cropped). */
function fitTile(cellW, cellH) {
  const aspect = Math.min(16 / 9, Math.max(3 / 4, cellW / cellH));
  const w = Math.max(0, Math.min(cellW, cellH * aspect));
  return { w, h: w / aspect };
}

function contentBox(element) {
  const style = getComputedStyle(element);
  const px = (value) => parseFloat(value) || 0;
  return {
    width: element.clientWidth - px(style.paddingLeft) - px(style.paddingRight),
    height: element.clientHeight - px(style.paddingTop) - px(style.paddingBottom),
    gap: px(style.columnGap) || 8,
    padRight: px(style.paddingRight),
    padBottom: px(style.paddingBottom),
  };
}

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}

/** Moves an element without restarting its video where the browser can (Element.moveBefore). */
function moveTo(parent, node, before) {
  if (typeof parent.moveBefore === 'function' && node.isConnected && parent.isConnected) {
    try {
      parent.moveBefore(node, before);
      return;
    } catch {
      // fall back to a plain insert
    }
  }
  parent.insertBefore(node, before);
}

/** Makes `nodes` children of `parent`, in this order, right before `anchor` (null: at the end). */
function arrange(parent, nodes, anchor) {
  let next = anchor;
  for (let i = nodes.length - 1; i >= 0; i -= 1) {
    const node = nodes[i];
    if (node.parentNode !== parent || node.nextElementSibling !== next) moveTo(parent, node, next);
    next = node;
  }
}

function setPx(name, value) {
  ui.grid.style.setProperty(name, `${Math.max(0, Math.floor(value))}px`);
}

export function layout() {
  const mode = currentLayout();
  const order = [...tiles.values()];
  ui.grid.dataset.layout = mode;
  ui.grid.dataset.count = String(order.length);
  ui.layoutSpeaker.setAttribute('aria-pressed', String(mode === 'speaker'));
  ui.layoutGallery.setAttribute('aria-pressed', String(mode === 'gallery'));
  if (mode === 'speaker') layoutSpeaker(order);
  else layoutGallery(order);
  updateTileMarks();
  queueVideoSizes();
}

function layoutGallery(order) {
  ui.grid.classList.remove('speaker', 'strip-side', 'strip-bottom', 'no-strip');
  arrange(ui.grid, order, ui.strip);
  ui.strip.hidden = true;
  const shown = order.filter((tile) => !tile.hidden);
  const remotes = shown.filter((tile) => tile.classList.contains('remote'));
  const local = tiles.get('local');
  const pip = remotes.length === 1 && shown.length === 2 && local && !local.hidden;
  const pages = pip ? 1 : Math.max(1, Math.ceil(shown.length / GALLERY_PAGE_SIZE));
  view.page = clamp(view.page, 0, pages - 1);
  const onPage = new Set(pip ? shown
    : shown.slice(view.page * GALLERY_PAGE_SIZE, (view.page + 1) * GALLERY_PAGE_SIZE));
  for (const tile of order) {
    tile.classList.remove('stage');
    tile.classList.toggle('off-page', !tile.hidden && !onPage.has(tile));
  }
  ui.grid.classList.toggle('pip', Boolean(pip));
  ui.grid.classList.toggle('paged', pages > 1);
  ui.pager.hidden = pages <= 1;
  ui.pageLabel.textContent = `${view.page + 1} / ${pages}`;
  ui.pagePrev.disabled = view.page === 0;
  ui.pageNext.disabled = view.page >= pages - 1;

  const inGrid = pip ? remotes : [...onPage];
  const count = Math.max(1, inGrid.length);
  const { width, height, gap, padRight, padBottom } = contentBox(ui.grid);
  if (width <= 0 || height <= 0) return;
  // Try every column count; the arrangement with the largest tiles wins, counting only the part of a 16:9
  // picture a tile shows (a tall tile crops the sides away), so that close calls go to wider tiles.
  let best = { w: 0, h: 0 };
  let bestScore = 0;
  for (let cols = 1; cols <= count; cols += 1) {
    const rows = Math.ceil(count / cols);
    const tile = fitTile((width - gap * (cols - 1)) / cols, (height - gap * (rows - 1)) / rows);
    const shown = Math.min(1, (tile.w / tile.h) / (16 / 9));
    const score = tile.w * tile.h * Math.sqrt(shown);
    if (score > bestScore) {
      best = tile;
      bestScore = score;
    }
  }
  setPx('--tile-w', best.w);
  setPx('--tile-h', best.h);
  // The picture-in-picture sits inside the corner of the big tile, not beyond it.
  setPx('--pip-right', (width - best.w) / 2 + padRight + 14);
  setPx('--pip-bottom', (height - best.h) / 2 + padBottom + 14);
}

function layoutSpeaker(order) {
  ui.grid.classList.remove('pip', 'paged');
  ui.pager.hidden = true;
  const id = stageId();
  const stage = id ? tiles.get(id) : null;
  const others = order.filter((tile) => tile !== stage);
  for (const tile of order) {
    tile.classList.toggle('stage', tile === stage);
    tile.classList.remove('off-page');
  }
  arrange(ui.grid, stage ? [stage] : [], ui.strip);
  arrange(ui.strip, others, null);
  const withStrip = others.some((tile) => !tile.hidden);
  ui.strip.hidden = !withStrip;

  ui.grid.classList.add('speaker');
  const box = contentBox(ui.grid);
  // Wide stages put the thumbnails in a column on the right; narrow (portrait) ones in a row below.
  const side = box.width >= box.height * 1.25;
  ui.grid.classList.toggle('strip-side', withStrip && side);
  ui.grid.classList.toggle('strip-bottom', withStrip && !side);
  ui.grid.classList.toggle('no-strip', !withStrip);
  if (box.width <= 0 || box.height <= 0) return;
  // Thumbnails: small (200-320 px wide beside the stage), and as small as needed within that for all of them
  // to fit without scrolling; a row below a narrow stage takes smaller ones.
  const count = Math.max(1, others.filter((tile) => !tile.hidden).length);
  const stripGap = parseFloat(getComputedStyle(ui.strip).rowGap) || 8;
  const fitting = side ? ((box.height - stripGap * (count - 1)) / count) * THUMB_ASPECT
    : (box.width - stripGap * (count - 1)) / count;
  const thumbW = side ? clamp(Math.min(box.width * 0.2, fitting), 200, 320)
    : clamp(Math.min(box.width * 0.3, fitting), 112, 240);
  const thumbH = thumbW / THUMB_ASPECT;
  let stageW = box.width;
  let stageH = box.height;
  if (withStrip && side) stageW -= thumbW + box.gap;
  if (withStrip && !side) stageH -= thumbH + box.gap;
  const big = fitTile(stageW, stageH);
  setPx('--stage-w', big.w);
  setPx('--stage-h', big.h);
  setPx('--thumb-w', thumbW);
  setPx('--thumb-h', thumbH);
}

/** data-speaking on the active speaker's tile (ours too), data-pinned and the pin buttons' state. */
function updateTileMarks() {
  const speaker = huddle.activeSpeaker;
  for (const [id, tile] of tiles) {
    const participantId = id === 'local' ? huddle.self?.id : id;
    if (speaker && participantId === speaker) tile.dataset.speaking = 'true';
    else delete tile.dataset.speaking;
    if (id === 'local') continue;
    if (view.pinned === id) tile.dataset.pinned = 'true';
    else delete tile.dataset.pinned;
    updatePinButton(tile);
  }
}

/** Pins a participant (speaker view, large) or, when they are pinned already, unpins them. */
export function togglePin(participantId) {
  if (view.pinned === participantId) {
    view.pinned = null;
  } else if (tiles.has(participantId)) {
    view.pinned = participantId;
    view.choice = 'speaker'; // a pinned participant is shown large
  }
  layout();
}

export function setLayout(choice) {
  view.choice = choice;
  layout();
}

/**
 * A remote screen share (its tile's key) started showing: it takes the stage, over the speaker (a pin still
 * wins), and the viewer's gallery view becomes speaker view so that it is large.
 */
export function noteScreen(key) {
  if (!tiles.has(key)) return;
  view.screens = view.screens.filter((k) => k !== key);
  view.screens.push(key);
  if (view.choice === 'gallery') view.choice = 'speaker';
  layout();
}

/** Someone new speaks: remembered, so that they stay large once they stop (and nobody else speaks). */
export function noteSpeaker(id) {
  if (id && id !== huddle.self?.id && tiles.has(id)) view.lastSpeaker = id;
  layout(); // the large tile follows the speaker (unless someone is pinned)
}

// --- adaptive stream: how large each remote video is shown (docs/protocol.md, "video_sizes") ---
//
// For every remote tile, the size of its video in device pixels; 0x0 when it is not shown: hidden
// (display: none, e.g. on another gallery page), scrolled out of the strip or the viewport, or the whole tab
// is in the background. HuddleClient.setVideoSizes sends it (SFU mode only, on change, at most every 250 ms).
//
// A ResizeObserver (sizes) and an IntersectionObserver (scrolling in and out of view) say when to measure;
// the measurement itself checks each video against the viewport and its clipping ancestors, as the
// IntersectionObserver does. Its own verdicts can lag: one comes a frame after a layout change, and a video
// shown again (display: none before) but scrolled out of the strip gets none at all (still not intersecting).
const sizeObserver = new ResizeObserver(() => queueVideoSizes());
const visibilityObserver = new IntersectionObserver(() => queueVideoSizes());

function watchVideoSize(video) {
  sizeObserver.observe(video);
  visibilityObserver.observe(video);
}

function unwatchVideoSize(video) {
  sizeObserver.unobserve(video);
  visibilityObserver.unobserve(video);
}

/** Whether some of `element` is on screen: inside the viewport and inside every ancestor that clips. */
function onScreen(element, clips) {
  const rect = element.getBoundingClientRect();
  let left = Math.max(rect.left, 0);
  let top = Math.max(rect.top, 0);
  let right = Math.min(rect.right, window.innerWidth);
  let bottom = Math.min(rect.bottom, window.innerHeight);
  for (let node = element.parentElement; node && node !== document.body; node = node.parentElement) {
    if (!clips.has(node)) {
      const style = getComputedStyle(node);
      const clipping = style.overflowX !== 'visible' || style.overflowY !== 'visible';
      clips.set(node, clipping ? node.getBoundingClientRect() : null);
    }
    const clip = clips.get(node);
    if (!clip) continue;
    left = Math.max(left, clip.left);
    top = Math.max(top, clip.top);
    right = Math.min(right, clip.right);
    bottom = Math.min(bottom, clip.bottom);
  }
  return right > left && bottom > top;
}

function measureVideoSizes() {
  const sizes = {};
  const clips = new Map(); // ancestor -> its clip rectangle (null: it does not clip), for this measurement
  const tabShown = document.visibilityState === 'visible';
  const ratio = window.devicePixelRatio || 1;
  for (const [id, tile] of tiles) {
    if (isOwnTile(id)) continue;
    const video = $('video', tile);
    const inView = tabShown && video.clientWidth > 0 && video.clientHeight > 0 && onScreen(video, clips);
    const w = inView ? Math.round(video.clientWidth * ratio) : 0;
    const h = inView ? Math.round(video.clientHeight * ratio) : 0;
    sizes[id] = w > 0 && h > 0 ? [w, h] : [0, 0];
  }
  return sizes;
}

export function reportVideoSizes() {
  sizesQueued = false;
  huddle.setVideoSizes(measureVideoSizes());
}

// Observers fire in bursts (one layout change resizes many tiles): one measurement after the burst. Not
// requestAnimationFrame: it does not run in a background tab, which must report 0x0 at once.
let sizesQueued = false;
function queueVideoSizes() {
  if (sizesQueued) return;
  sizesQueued = true;
  setTimeout(reportVideoSizes, 0);
}

function onTile(change, id, tile) {
  if (!isOwnTile(id)) {
    const video = $('video', tile);
    if (change === 'added') {
      watchVideoSize(video);
    } else {
      unwatchVideoSize(video);
      if (view.pinned === id) view.pinned = null;
      if (view.lastSpeaker === id) view.lastSpeaker = null;
      view.screens = view.screens.filter((key) => key !== id);
    }
  }
  layout();
}

/** Lays out the tiles of `client` (a HuddleClient) from now on and reports their sizes to it. */
export function initStage(client) {
  huddle = client;
  onTileChange(onTile);
  document.addEventListener('visibilitychange', reportVideoSizes);
  new ResizeObserver(() => layout()).observe(ui.grid);
  ui.layoutSpeaker.addEventListener('click', () => setLayout('speaker'));
  ui.layoutGallery.addEventListener('click', () => setLayout('gallery'));
  ui.grid.addEventListener('click', (event) => {
    const pin = event.target.closest('.pin');
    const tile = pin && pin.closest('.tile.remote');
    if (tile) togglePin(tile.dataset.participantId);
  });
  ui.pagePrev.addEventListener('click', () => {
    view.page -= 1;
    layout();
  });
  ui.pageNext.addEventListener('click', () => {
    view.page += 1;
    layout();
  });
}
