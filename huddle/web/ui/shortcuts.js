// Keyboard shortcuts of the call, and the list of them (opened from Settings or with "?"). A shortcut presses
// the button it stands for, found on the page by its id or its label, so that it does what a click does and
// works for buttons other modules add (screen sharing, chat). Nothing fires while typing in a field.

import { $ } from './dom.js';

const MAC = /Mac|iPhone|iPad/.test(navigator.platform || navigator.userAgent);

/** The label a person reads on `button` (aria-label, else its text). */
function buttonLabel(button) {
  return (button.getAttribute('aria-label') || button.textContent || '').replace(/\s+/g, ' ').trim();
}

/** A button of the call's bars whose label starts with one of `labels` (case-insensitive). */
function buttonLabelled(...labels) {
  const wanted = labels.map((label) => label.toLowerCase());
  return [...document.querySelectorAll('.controls button, .topbar button')]
    .find((button) => wanted.some((label) => buttonLabel(button).toLowerCase().startsWith(label))) || null;
}

// keys: what to press ("Ctrl" is Cmd on a Mac); button(): the button pressed, or null when there is none.
const SHORTCUTS = [
  { keys: ['M', 'Ctrl+D'], what: 'Turn the microphone off or on', button: () => $('#toggle-audio') },
  { keys: ['V', 'Ctrl+E'], what: 'Turn the camera off or on', button: () => $('#toggle-video') },
  {
    keys: ['S'],
    what: 'Share your screen, or stop sharing',
    button: () => buttonLabelled('Share screen', 'Stop sharing'),
  },
  { keys: ['C'], what: 'Open or close the chat', button: () => buttonLabelled('Chat') },
  { keys: ['Shift+L'], what: 'Leave the call', button: () => $('#leave') },
  { keys: ['?'], what: 'Show this list', button: null },
];

const ui = {
  panel: $('#shortcuts-panel'),
  list: $('.shortcut-list', $('#shortcuts-panel')),
  close: $('#close-shortcuts'),
};

let returnFocus = null; // where focus goes back to when the list closes

function shown(key) {
  return MAC ? key.replace('Ctrl+', '⌘') : key;
}

function matches(event, combo) {
  const parts = combo.split('+');
  const key = parts.pop();
  if ((event.ctrlKey || event.metaKey) !== parts.includes('Ctrl') || event.altKey) return false;
  if (key === '?') return event.key === '?'; // Shift on most layouts, not on all
  if (event.shiftKey !== parts.includes('Shift')) return false;
  return event.key.toLowerCase() === key.toLowerCase();
}

function typing(target) {
  return target instanceof HTMLElement
    && (target.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(target.tagName));
}

function usable(button) {
  return Boolean(button && !button.disabled && button.getClientRects().length
    && getComputedStyle(button).visibility === 'visible');
}

/** Screen readers announce the shortcut of each button (aria-keyshortcuts). */
function markButtons() {
  for (const shortcut of SHORTCUTS) {
    const button = shortcut.button?.();
    const keys = shortcut.keys.map((key) => key.replace('Ctrl', MAC ? 'Meta' : 'Control')).join(' ');
    if (button && button.getAttribute('aria-keyshortcuts') !== keys) button.setAttribute('aria-keyshortcuts', keys);
  }
}

export function showShortcuts(open) {
  if (open === !ui.panel.hidden) return;
  ui.panel.hidden = !open;
  if (open) {
    returnFocus = document.activeElement;
    ui.close.focus();
  } else if (returnFocus?.isConnected) {
    returnFocus.focus();
  }
}

export function initShortcuts() {
  for (const shortcut of SHORTCUTS) {
    const keys = document.createElement('dt');
    keys.append(...shortcut.keys.flatMap((key, i) => {
      const kbd = document.createElement('kbd');
      kbd.textContent = shown(key);
      return i ? [' or ', kbd] : [kbd];
    }));
    const what = document.createElement('dd');
    what.textContent = shortcut.what;
    ui.list.append(keys, what);
  }
  markButtons();
  // Buttons other modules add later get their mark too.
  new MutationObserver(markButtons).observe($('.controls'), { childList: true, subtree: true, attributes: true,
    attributeFilter: ['aria-label', 'hidden'] });
  ui.close.addEventListener('click', () => showShortcuts(false));

  document.addEventListener('keydown', (event) => {
    if (event.defaultPrevented || event.repeat || event.isComposing || typing(event.target)) return;
    if (event.key === 'Escape' && !ui.panel.hidden) {
      showShortcuts(false);
      return;
    }
    const shortcut = SHORTCUTS.find((candidate) => candidate.keys.some((key) => matches(event, key)));
    if (!shortcut) return;
    if (!shortcut.button) {
      event.preventDefault();
      showShortcuts(ui.panel.hidden);
      return;
    }
    // In the call only: before joining, letters belong to the pre-join screen.
    if (document.body.dataset.view !== 'call') return;
    const button = shortcut.button();
    if (!usable(button)) return;
    event.preventDefault(); // Ctrl+D would bookmark the page, Ctrl+E search
    button.click();
  });
}
