// The panels in place of the call: the name form before joining, and the one after leaving or losing the
// call (with its rejoin button).

import { cleanDisplayName } from '../client.js';
import { $ } from './dom.js';
import { layout } from './stage.js';
import { ERROR_WORDS } from './status.js';

const NAME_KEY = 'huddle.name';

const ui = {
  joinPanel: $('#join-panel'),
  joinForm: $('#join-form'),
  nameInput: $('#name-input'),
  nameError: $('#name-error'),
  leftPanel: $('#left-panel'),
  leftTitle: $('#left-title'),
  leftNote: $('#left-note'),
  rejoin: $('#rejoin'),
};

/** `panel`: one of the panels, or null for the call itself. */
function showPanel(panel) {
  for (const candidate of [ui.joinPanel, ui.leftPanel]) candidate.hidden = candidate !== panel;
  document.body.dataset.view = panel === ui.joinPanel ? 'join' : panel === ui.leftPanel ? 'left' : 'call';
  if (panel === ui.joinPanel) ui.nameInput.focus();
  layout();
}

export function showCall() {
  showPanel(null);
}

/** After the call: `title`, `note` (may be empty) and, when `canRejoin`, a button saying `action`. */
export function showLeftPanel(title, note, action, canRejoin) {
  ui.leftTitle.textContent = title;
  ui.leftNote.textContent = note;
  ui.leftNote.hidden = !note;
  ui.rejoin.textContent = action;
  ui.rejoin.hidden = !canRejoin;
  showPanel(ui.leftPanel);
}

// Refusals that the same link can never get past: the panel says why, and offers no "Try again".
const HOPELESS_TITLES = {
  unauthorized: 'This invite link does not work',
  token_expired: 'This invite link has expired',
  wrong_room: 'This invite link is for another room',
  invalid_room: 'This is not a valid room link',
};

/**
 * The panel after joining failed with error `code` (null: unknown), saying `why` (the error's words). A retry
 * is offered only where one can work (a lost network, a full room) and `canRejoin` allows it.
 */
export function showJoinFailed(code, why, canRejoin) {
  const hopeless = code in HOPELESS_TITLES;
  showLeftPanel(HOPELESS_TITLES[code] || 'Could not join the call', why || '', 'Try again', canRejoin && !hopeless);
}

/** Asks for a name (`name` filled in, else the one this browser remembers), saying `message` if given. */
export function showNameForm(name, message) {
  ui.nameInput.value = name || localStorage.getItem(NAME_KEY) || '';
  ui.nameError.hidden = !message;
  ui.nameError.textContent = message || '';
  showPanel(ui.joinPanel);
}

export function nameFormShown() {
  return !ui.joinPanel.hidden;
}

/**
 * `onRejoin()`: the rejoin button was pressed. `onName(name)`: the name form gave a valid name (remembered in
 * this browser).
 */
export function initPanels({ onRejoin, onName }) {
  ui.rejoin.addEventListener('click', onRejoin);
  ui.joinForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = cleanDisplayName(ui.nameInput.value);
    if (!name) {
      ui.nameError.textContent = ERROR_WORDS.invalid_name;
      ui.nameError.hidden = false;
      ui.nameInput.focus();
      return;
    }
    try {
      localStorage.setItem(NAME_KEY, name);
    } catch {
      // private mode: nothing to remember with
    }
    onName(name);
  });
}
