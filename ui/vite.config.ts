import { defineConfig } from "vite";

// Two pages: the app (index.html) and the portal window's offline page, which is served
// from the app's origin but runs in a window with no command rights.
export default defineConfig({
  clearScreen: false,
  build: {
    target: "safari13",
    outDir: "dist",
    emptyOutDir: true,
    rollupOptions: {
      input: {
        main: "index.html",
        offline: "portal-offline.html",
      },
    },
  },
});
