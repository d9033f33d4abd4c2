// Applies the saved theme before first paint. "system" (nothing saved) follows prefers-color-scheme in CSS.
(function () {
  try {
    var theme = localStorage.getItem("qwenstack.theme");
    if (theme === "light" || theme === "dark") document.documentElement.setAttribute("data-theme", theme);
  } catch (e) { /* storage disabled: follow the system */ }
})();
