// What every part of the page uses to find its elements.

export const $ = (selector, root = document) => root.querySelector(selector);
