// The call's chat (docs/protocol.md, "chat"): the Chat button with its unread count, and the panel with the
// messages and the box to write one. Messages are text: shown with textContent, and the http(s) links in them
// made into links by building <a> elements, never by parsing HTML.

import { $ } from './dom.js';
import { placeSidePanel } from './people.js';

const ui = {
  button: $('#toggle-chat'),
  badge: $('#toggle-chat .unread-badge'),
  panel: $('#chat-panel'),
  close: $('#chat-panel .side-panel-close'),
  list: $('#chat-messages'),
  empty: $('#chat-empty'),
  form: $('#chat-form'),
  input: $('#chat-input'),
  note: $('#chat-note'),
};

// An http(s) address, up to the first blank or character no address ends with in running text.
const LINK = /https?:\/\/[^\s<>"'`]+/g;
const TRAILING = /[.,;:!?)\]}]+$/;

const ERROR_WORDS = {
  rate_limited: 'You are sending messages quickly: wait a moment, then send again.',
  bad_message: 'That message could not be sent: it may be empty or too long (1,000 characters at most).',
};

let huddle = null; // the HuddleClient (initChat)
const shown = new Set(); // ids of the messages in the panel
let unread = 0;
let noteTimer = null;

/** `text` as nodes: text, and <a> for each http(s) link in it. */
export function textWithLinks(text) {
  const nodes = [];
  let at = 0;
  for (const match of text.matchAll(LINK)) {
    const address = match[0].replace(TRAILING, '');
    let url = null;
    try {
      url = new URL(address);
    } catch {
      continue; // not an address after all: left as text
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') continue;
    if (match.index > at) nodes.push(document.createTextNode(text.slice(at, match.index)));
    const link = document.createElement('a');
    link.href = url.href;
    link.textContent = address;
    link.target = '_blank';
    link.rel = 'noopener noreferrer';
    nodes.push(link);
    at = match.index + address.length;
  }
  if (at < text.length) nodes.push(document.createTextNode(text.slice(at)));
  return nodes;
}

function timeOf(at) {
  const when = new Date(at * 1000);
  const time = document.createElement('time');
  time.dateTime = when.toISOString();
  time.textContent = when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  time.title = when.toLocaleString();
  return time;
}

function messageElement(message) {
  const item = document.createElement('li');
  item.className = 'chat-message';
  const mine = message.from !== null && message.from === huddle.self?.id;
  if (mine) item.classList.add('mine');
  const meta = document.createElement('div');
  meta.className = 'chat-meta';
  const name = document.createElement('span');
  name.className = 'chat-name';
  name.textContent = mine ? `${message.name || 'You'} (you)` : message.name || 'Guest';
  meta.append(name, ' ', timeOf(message.at));
  const text = document.createElement('p');
  text.className = 'chat-text';
  text.append(...textWithLinks(message.text));
  item.append(meta, text);
  return item;
}

function isOpen() {
  return !ui.panel.hidden;
}

function updateButton() {
  ui.badge.textContent = unread > 99 ? '99+' : String(unread);
  ui.badge.hidden = unread === 0;
  ui.button.setAttribute('aria-label', unread ? `Chat, ${unread} unread` : 'Chat');
  ui.button.setAttribute('aria-expanded', String(isOpen()));
}

function add(message) {
  if (shown.has(message.id)) return;
  shown.add(message.id);
  const atBottom = ui.list.scrollHeight - ui.list.scrollTop - ui.list.clientHeight < 40;
  ui.list.append(messageElement(message));
  ui.empty.hidden = true;
  if (!isOpen() && message.from !== huddle.self?.id) unread += 1;
  // Follow the conversation unless the reader scrolled back to read something older.
  if (atBottom || message.from === huddle.self?.id) ui.list.scrollTop = ui.list.scrollHeight;
  updateButton();
}

/** The whole chat afresh, from the client's (after joining: the history that came with `joined`). */
function render() {
  ui.list.replaceChildren();
  shown.clear();
  unread = 0;
  ui.empty.hidden = huddle.chat.length > 0;
  for (const message of huddle.chat) add(message);
  updateButton();
}

function say(text) {
  clearTimeout(noteTimer);
  ui.note.textContent = text;
  ui.note.hidden = !text;
  if (text) noteTimer = setTimeout(() => say(''), 8000);
}

export function openChat(open = !isOpen()) {
  ui.panel.hidden = !open;
  placeSidePanel(ui.panel);
  document.body.classList.toggle('chat-open', open);
  if (open) {
    unread = 0;
    ui.list.scrollTop = ui.list.scrollHeight;
    ui.input.focus();
    document.dispatchEvent(new CustomEvent('huddle:side-panel', { detail: { panel: ui.panel } }));
  } else if (document.activeElement && ui.panel.contains(document.activeElement)) {
    ui.button.focus();
  }
  updateButton();
}

function send() {
  const text = ui.input.value.trim();
  if (!text) return;
  if (huddle.sendChat(text)) {
    ui.input.value = '';
    say('');
  } else {
    say('Not connected to the call: the message was not sent.');
  }
}

/** The chat of `client` (a HuddleClient) from now on. */
export function initChat(client) {
  huddle = client;
  huddle.addEventListener('joined', render);
  huddle.addEventListener('chat', (event) => add(event.detail.message));
  huddle.addEventListener('error', (event) => {
    const { code, message, request } = event.detail;
    if (request !== 'chat') return;
    say(ERROR_WORDS[code] || `The message was not sent: ${message}`);
  });
  huddle.addEventListener('state', (event) => {
    const inCall = ['connecting', 'connected', 'reconnecting'].includes(event.detail.state);
    ui.input.disabled = !inCall;
    if (!inCall) openChat(false);
  });
  ui.button.addEventListener('click', () => openChat());
  ui.close.addEventListener('click', () => openChat(false));
  ui.form.addEventListener('submit', (event) => {
    event.preventDefault();
    send();
  });
  // Enter sends; Shift+Enter starts a new line.
  ui.input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.panel.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') openChat(false);
  });
  // One side panel at a time: another opening closes this one.
  document.addEventListener('huddle:side-panel', (event) => {
    if (event.detail.panel !== ui.panel && isOpen()) openChat(false);
  });
  updateButton();
}
