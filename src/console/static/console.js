// walhook console: conveniences only; every page works without this file.
"use strict";
document.addEventListener("click", function (ev) {
  var t = ev.target;
  if (!(t instanceof Element)) return;
  var box = t.closest("input[data-select-all]");
  if (box) {
    var name = box.getAttribute("data-select-all");
    var form = box.form || box.closest("form");
    if (form) {
      form.querySelectorAll('input[type=checkbox][name="' + name + '"]').forEach(function (c) {
        c.checked = box.checked;
      });
    }
    return;
  }
  var confirmed = t.closest("[data-confirm]");
  if (confirmed && !window.confirm(confirmed.getAttribute("data-confirm"))) {
    ev.preventDefault();
  }
});
